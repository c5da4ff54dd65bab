"""``NF4Linear``: a frozen NF4 base weight, dequantized on the fly for each matmul.

Only the packed codes are kept between forward and backward: backward dequantizes again rather than
saving a float copy, which is what keeps QLoRA's activation memory at the bf16 LoRA level (under
gradient checkpointing, the recompute's copy serves the backward that follows it).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    class DTensor:  # type: ignore[no-redef]
        pass

from lightning_nf4.format import NF4FormatError, NF4Weight, from_bnb_tensors, quantize_nf4, to_bnb_tensors
from lightning_nf4.format.bnb_state import is_bnb_quantized
from lightning_nf4.format.tensor import NF4Tensor, dequantize_weight
from lightning_nf4.format.quantized import NESTED_BLOCKSIZE, NestedStats, SUPPORTED_DTYPES, check_blocksize
from lightning_nf4.kernels import ops
from lightning_nf4.layers.group import DequantGroup


def _check_compute_dtype(compute_dtype: torch.dtype, what: str = "compute_dtype") -> None:
    if compute_dtype not in SUPPORTED_DTYPES:
        given = f"the string {compute_dtype!r}: pass torch.{compute_dtype.removeprefix('torch.')}" if isinstance(compute_dtype, str) else str(compute_dtype)
        raise ValueError(f"{what} must be one of torch.float32, torch.bfloat16, torch.float16; got {given}.")


def _recorded_by_checkpoint() -> bool:
    """True while ``torch.utils.checkpoint`` (non-reentrant) runs this forward. Tensors saved then are
    dropped in the first pass and kept only by the recompute, whose backward follows at once, so the
    dequantized weight may be saved: one dequantization less per layer and step. Eager only: under
    torch.compile the forward takes ``_NF4Matmul`` before asking."""
    hooks = _top_saved_tensors_hooks()
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


def _in_checkpoint_recompute() -> bool:
    """True while ``torch.utils.checkpoint`` (non-reentrant, HF's or FSDP's composable one) recomputes this
    forward inside a backward; False in its first pass and outside checkpointing. Eager only."""
    hooks = _top_saved_tensors_hooks()
    return (
        hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"
        and getattr(hooks[0], "__qualname__", "").startswith("_recomputation_hook")
    )


def _top_saved_tensors_hooks() -> Optional[tuple[Any, Any]]:
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks(False) if top_hooks is not None else None


class _NF4Matmul(torch.autograd.Function):
    """``x @ W.T`` with ``w``, the dequantized ``W``, dequantized again in backward, and no weight gradient.
    Used under torch.compile, which traces a Function; eager calls use ``_Redequantize``. The compiler keeps
    the forward's ``w`` for the backward unless ``NF4Linear._compiled_weight`` tags it for recomputation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, packed: Tensor, weight: NF4Weight, dtype: torch.dtype, w: Tensor) -> Tensor:
        ctx.weight = weight  # holds references to the packed tensors only
        ctx.dtype = dtype
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        w = ctx.weight.dequantize(ctx.dtype)
        with torch.autocast(grad_out.device.type, enabled=False):
            return torch.matmul(grad_out.to(ctx.dtype), w), None, None, None, None


class _NF4TensorMatmul(torch.autograd.Function):
    """``_NF4Matmul`` for an ``NF4Tensor`` weight (the form FSDP2 all-gathers), under torch.compile: the
    weight is saved as the tensor it is, and read through the ``dequantize_nf4_tensor`` op both ways, which
    compiled code can trace where it cannot follow the tensor's ``.quant``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, dtype: torch.dtype, w: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        with torch.autocast(grad_out.device.type, enabled=False):
            return torch.matmul(grad_out.to(ctx.dtype), dequantize_weight(weight, ctx.dtype)), None, None, None


class _Redequantize:
    """Saved-tensor hooks around one matmul: autograd keeps, in place of the dequantized weight (or a view
    of it), how to make it again, and backward dequantizes anew. Same effect as ``_NF4Matmul``, with
    native autograd nodes instead of a Python Function (less host time per call). Holds no reference
    to the weight itself, only its address, so the float copy dies with the forward."""

    __slots__ = ("ptr", "offset", "quant", "dtype")

    def __init__(self, weight: Tensor, quant: NF4Weight, dtype: torch.dtype) -> None:
        self.ptr, self.offset = weight.untyped_storage().data_ptr(), weight.storage_offset()
        self.quant, self.dtype = quant, dtype

    def pack(self, tensor: Tensor) -> Any:
        if tensor.untyped_storage().data_ptr() == self.ptr:
            return self, tensor.size(), tensor.stride(), tensor.storage_offset() - self.offset
        return tensor

    @staticmethod
    def unpack(saved: Any) -> Tensor:
        if not isinstance(saved, tuple):
            return saved
        hooks, size, stride, offset = saved
        fresh = hooks.quant.dequantize(hooks.dtype)
        return fresh.as_strided(size, stride, fresh.storage_offset() + offset)


def _empty_nf4(out_features: int, in_features: int, blocksize: int, double_quant: bool, dtype: torch.dtype, device: Any) -> NF4Weight:
    # Placeholder storage of the right layout (all-zero scales), to be filled by load_state_dict.
    from lightning_nf4.format import code_table, dynamic_map

    numel = out_features * in_features
    blocks = -(-numel // blocksize)
    packed = torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device)
    nested = None
    if double_quant:
        absmax = torch.zeros(blocks, dtype=torch.uint8, device=device)
        nested = NestedStats(
            absmax=torch.zeros(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
            code=dynamic_map(device), offset=torch.zeros((), dtype=torch.float32, device=device),
        )
    else:
        absmax = torch.zeros(blocks, dtype=torch.float32, device=device)
    return NF4Weight(packed, absmax, code_table("nf4", device), torch.Size((out_features, in_features)), dtype, blocksize, nested)


def _check_replacement(quant: NF4Weight, weight: Tensor) -> None:
    """The packed parameter changed outside this class: the scales can follow codes that moved (``.to(device)``,
    ``.data`` swapped for a copy), never other codes (``layer.weight = other.weight``: their scales are unknown here)
    nor a tensor that is not packed codes (``vector_to_parameters`` writes floats)."""
    if weight.dtype != torch.uint8 or weight.shape != quant.packed.shape:
        raise RuntimeError(
            f"NF4Linear's weight was replaced by a {weight.dtype} tensor of shape {tuple(weight.shape)}; it holds packed "
            f"NF4 codes (uint8, {tuple(quant.packed.shape)}) paired with scales kept beside them. Replace the weight "
            "with layer.quant = quantize_nf4(new_weight) or load_state_dict, not by assigning tensors to layer.weight."
        )
    old = quant.packed
    if old is not weight and old.device == weight.device and not weight.is_meta and not old.is_meta \
            and old.data_ptr() != weight.data_ptr() and not torch.equal(old, weight):
        raise RuntimeError(
            "NF4Linear's weight was replaced by other packed codes (layer.weight = another_layer.weight?): their "
            "scales are not known here, so the codes cannot be read. Share the NF4Linear module itself to tie two "
            "weights, or set codes and scales together with layer.quant = other.quant."
        )


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's linears): ``x @ W + b`` with ``W`` stored ``[in_features, out_features]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), Tensor)


class NF4Linear(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight is stored in bitsandbytes' NF4 format and frozen.

    ``weight`` is the packed uint8 parameter (``requires_grad=False``) so that optimizers, DDP and
    ``.to()`` see it; the scales live in ``self.quant`` (an ``NF4Weight``) and follow it between devices.
    The state dict uses bitsandbytes' ``Linear4bit`` keys; loading a float ``weight`` quantizes it.
    """

    low_memory_recompute: bool = False
    """Under activation checkpointing, keep no dequantized weight from the recompute to the backward: the
    backward dequantizes again, and the recompute dequantizes this weight alone (not its group's block). Saves
    a decoder layer's dequantized weights at the start of its backward for one more dequantize per weight and
    step; off by default (speed), on under ``NF4FSDPStrategy``. Set it with ``set_low_memory_recompute``."""

    stored_transposed: bool = False
    """The float weight this layer stands for is stored ``[in_features, out_features]`` (transformers' ``Conv1D``,
    GPT-2): a float weight is read, and a merged export written, in that layout. The NF4 codes are ``[out, in]``
    either way, as bitsandbytes quantizes a ``Conv1D``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self._group: Optional[DequantGroup] = None
        _check_compute_dtype(compute_dtype)
        dtype = dtype or torch.get_default_dtype()
        _check_compute_dtype(dtype, "dtype (what the weight is quantized from and the bias is kept in)")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"NF4Linear needs at least one input and one output feature, got in_features={in_features}, "
                             f"out_features={out_features} (a weight without elements has nothing to quantize).")
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = check_blocksize(blocksize)
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self._set_quant(_empty_nf4(out_features, in_features, blocksize, double_quant, dtype, device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        *,
        name: str = "linear",
    ) -> "NF4Linear":
        """Quantize ``linear`` (an ``nn.Linear``, or transformers' ``Conv1D``) on the device its weight is on; the
        bias is kept as is (same Parameter)."""
        transposed = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or transposed):
            raise TypeError(f"{name}: from_linear expects an nn.Linear or transformers' Conv1D, got {type(linear).__name__}.")
        weight = linear.weight
        if weight.dim() != 2:
            raise NF4FormatError(f"{name}.weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}.")
        weight = weight.detach().t().contiguous() if transposed else weight.detach()
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._group = None
        _check_compute_dtype(compute_dtype)
        layer.out_features, layer.in_features = weight.shape
        layer.blocksize, layer.double_quant, layer.compute_dtype = check_blocksize(blocksize), double_quant, compute_dtype
        layer.stored_transposed = transposed
        layer._set_quant(quantize_nf4(weight, blocksize, double_quant, name=f"{name}.weight"))
        layer.bias = linear.bias
        return layer

    def float_layout(self, weight: Tensor) -> Tensor:
        """``weight`` (``[out_features, in_features]``) in the layout of the float layer this one stands for."""
        return weight.t() if self.stored_transposed else weight

    def reset_parameters(self) -> None:
        """Draw a float weight as ``nn.Linear`` does and quantize it: how a layer built on the meta device gets
        values once it has storage (``module.to_empty(device=...)``), with one float weight alive at a time."""
        device = self.weight.device
        if device.type == "meta":
            return
        weight = torch.empty(self.out_features, self.in_features, dtype=self.quant.dtype, device=device)  # either form
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self._set_quant(quantize_nf4(weight, self.blocksize, self.double_quant))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def to_nf4_tensor(self) -> None:
        """Hold the weight as one ``NF4Tensor`` parameter (codes and scales together): the form FSDP2
        shards by rows and all-gathers. Same bytes, same results; idempotent."""
        if not isinstance(self.weight, NF4Tensor):
            quant = self._synced_quant()
            self.weight = nn.Parameter(NF4Tensor(quant), requires_grad=False)
            self._quant = None  # the NF4Tensor holds the layout: no second reference to the whole weight
            self._drop_group_round()

    def _set_quant(self, quant: NF4Weight) -> None:
        """A new weight, in the form the layer holds (an ``NF4Tensor`` stays one: the form FSDP2 shards)."""
        self.blocksize, self.double_quant = quant.blocksize, quant.double_quant
        if isinstance(self._parameters.get("weight"), NF4Tensor):
            self.weight = nn.Parameter(NF4Tensor(quant), requires_grad=False)
            self._quant = None
        else:
            self.weight = nn.Parameter(quant.packed, requires_grad=False)
            self._quant = quant.with_packed(self.weight)
        self._drop_group_round()  # weights dequantized from the old codes must not be handed out

    # -- behaviour ----------------------------------------------------------------------------
    @property
    def quant(self) -> NF4Weight:
        """The weight's NF4 layout (codes, scales, tables), following the packed parameter wherever it is."""
        return self._synced_quant()

    @quant.setter
    def quant(self, value: NF4Weight) -> None:
        """Replace the weight: codes and scales together (e.g. ``layer.quant = quantize_nf4(w)``)."""
        if tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear.quant: the layout is {tuple(value.shape)}, this layer is [{self.out_features}, "
                             f"{self.in_features}] (out_features, in_features).")
        self._set_quant(value)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight ``[out_features, in_features]`` (the original dtype unless ``dtype`` is given)."""
        return self._synced_quant().dequantize(dtype)

    def to_float(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The float layer this one stands for (``nn.Linear``, or transformers' ``Conv1D`` for a transposed one), with
        the dequantized weight in ``dtype`` (by default the dtype it was quantized from) on this layer's device; the
        inverse of ``from_linear``. The bias is kept (cast when ``dtype`` is given)."""
        weight = nn.Parameter(self.float_layout(self.dequantize(dtype)).contiguous())
        with torch.device("meta"):  # no float weight drawn only to be replaced
            if self.stored_transposed:
                from transformers.pytorch_utils import Conv1D

                layer: nn.Module = Conv1D(self.out_features, self.in_features)
            else:
                layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = weight
        bias = self.bias
        layer.bias = bias if bias is None or dtype is None or bias.dtype == dtype else nn.Parameter(bias.detach().to(dtype))
        return layer

    def _synced_quant(self) -> NF4Weight:
        # The packed Parameter may have been replaced or moved by code outside this class (e.g. a
        # strategy's model.to(device)); the scales follow it here. An NF4Tensor weight (the form FSDP2
        # shards and all-gathers) carries its own scales.
        weight = self._parameters.get("weight")
        if weight is None:
            weight = self.weight
        quant = self._quant
        if quant is not None and quant.packed is weight:  # the common case, cheaply (host time per 1-token call)
            index = weight.get_device()  # -1 for CPU and meta alike: those take the full compare below
            if index >= 0 and quant.absmax.get_device() == index:
                return quant
        if isinstance(weight, NF4Tensor):
            return weight.quant
        if isinstance(weight, DTensor):
            raise RuntimeError(
                "This NF4Linear's weight is sharded across ranks (FSDP2) and not gathered now; its full weight exists "
                "only inside the forward and backward of the sharding unit that holds it (NF4FSDPStrategy's "
                "sharding_units: by default each decoder layer, or each child of the LightningModule). Call that unit's "
                "forward, not a layer inside it directly; the exports (LoRACallback save_dir) gather the weights for you."
            )
        if quant.packed is not weight or quant.absmax.device != weight.device:
            _check_replacement(quant, weight)
            quant = self._quant = quant.with_packed(weight)
        return quant

    def forward(self, x: Tensor) -> Tensor:
        """Under autocast: computes and returns the autocast dtype. Otherwise computes in
        ``compute_dtype`` and returns the input's dtype, as ``bitsandbytes.nn.Linear4bit`` does."""
        if not x.is_floating_point() or x.is_meta:
            return self._shape_only(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.compute_dtype
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        compiling = torch.compiler.is_compiling()
        if compiling and isinstance(self.weight, NF4Tensor):  # gathered by FSDP2: read through its dequantize op
            out = self._compiled_nf4_tensor(x.to(dtype), dtype, needs_grad)
        elif x.numel() == self.in_features and x.shape[-1] == self.in_features and not needs_grad:  # one token (generation): host time is the cost here
            flat = x.reshape(-1)
            out = self._gemv(flat if flat.dtype == dtype else flat.to(dtype), self._synced_quant(), compiling)
            out = out.view(*x.shape[:-1], self.out_features)
        elif needs_grad and compiling:
            quant = self._synced_quant()
            out = _NF4Matmul.apply(x.to(dtype), self.weight, quant, dtype, self._compiled_weight(self._dequantized, quant, dtype))
        else:
            quant = self._synced_quant()
            # low_memory_recompute: a checkpoint recompute dequantizes this weight alone, not its group's block
            alone = self.low_memory_recompute and not compiling and _in_checkpoint_recompute()
            w = quant.dequantize(dtype) if alone else self._dequantized(quant, dtype)
            # (torch.func's transforms wrap the weight in tensors without storage: plain autograd there)
            if needs_grad and (self.low_memory_recompute or not _recorded_by_checkpoint()) and not ops.in_functorch():
                hooks = _Redequantize(w, quant, dtype)
                with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                    out = torch.nn.functional.linear(x.to(dtype), w)
            else:
                # Nothing to save (no grad), or checkpointing drops what is saved and its recompute keeps the
                # weight for the backward that follows: plain autograd, whose C++ node costs less host time.
                out = torch.nn.functional.linear(x.to(dtype), w)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out if autocast or out.dtype == x.dtype else out.to(x.dtype)

    def _compiled_nf4_tensor(self, x: Tensor, dtype: torch.dtype, needs_grad: bool) -> Tensor:
        """The matmul under torch.compile when the weight is an ``NF4Tensor`` (sharded by FSDP2)."""
        if needs_grad:
            # Not _compiled_weight: its recompute tag gave wrong adapters under FSDP2 (test_compile's sharded fit);
            # here the compiler keeps the forward's float weight for backward.
            return _NF4TensorMatmul.apply(x, self.weight, dtype, dequantize_weight(self.weight, dtype))
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x, dequantize_weight(self.weight, dtype))

    def _compiled_weight(self, dequantize: Any, *args: Any) -> Tensor:
        """The float weight for a compiled matmul. The compiler sees that backward dequantizes the same weight
        again and keeps the forward's copy for it instead; with ``low_memory_recompute`` the copy is made in a
        checkpoint region, which tags it to be recomputed in backward, so none is kept."""
        if self.low_memory_recompute:
            return torch.utils.checkpoint.checkpoint(dequantize, *args, use_reentrant=False)
        return dequantize(*args)

    def _shape_only(self, x: Tensor) -> Tensor:
        """Inputs the matmul path does not take, handled as ``nn.Linear`` does: a non-float input is an error
        (a silent cast would truncate), and a ``meta`` input with a ``meta`` weight gives the output's shape."""
        if not x.is_floating_point():
            raise RuntimeError(
                f"NF4Linear expects a floating-point input, as nn.Linear does; got {x.dtype}. Token ids go through "
                "an embedding first; cast other inputs with x.float() (or .to(torch.bfloat16))."
            )
        if not self.weight.is_meta:
            raise RuntimeError(
                f"NF4Linear got an input on 'meta' but its weight is on {self.weight.device}; as with nn.Linear, input "
                "and weight must be on the same device (move the layer to 'meta' for shape-only runs)."
            )
        if x.shape[-1] != self.in_features:
            raise RuntimeError(
                f"NF4Linear: input's last dimension is {x.shape[-1]}, the layer takes {self.in_features} (in_features)."
            )
        out = x.new_empty(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def _dequantized(self, quant: NF4Weight, dtype: torch.dtype) -> Tensor:
        """The float weight for one matmul: from this layer's group (one launch for the whole block) when
        it has one, else its own dequantize."""
        group = self.__dict__.get("_group")
        if group is not None and not torch.compiler.is_compiling():
            return group.weight(self, dtype)
        return quant.dequantize(dtype)

    def _drop_group_round(self) -> None:
        group = self.__dict__.get("_group")
        if group is not None:
            group.clear()

    def _gemv(self, x: Tensor, quant: NF4Weight, compiling: bool) -> Tensor:
        """One token without autograd (generation): a matrix-vector product read straight from NF4. Eager GPU calls
        reuse a launch prepared for this ``quant`` and dtype (``ops.prepared_gemv``); a new or moved weight gets a new
        one, since ``_synced_quant`` then hands out a new ``quant``. Compiled code calls the op."""
        if not compiling and type(x) is Tensor:
            plan = ops.prepared_gemv(self, quant, x.dtype, self.out_features, self.in_features)
            if plan is not None:
                return plan(x)
        return ops.gemv_4bit(
            x, quant.packed, quant.absmax, quant.code, quant.blocksize, self.out_features, self.in_features, *quant.nested_args()
        )

    def _apply(self, fn: Any, recurse: bool = True) -> "NF4Linear":
        super()._apply(fn, recurse)
        # Only devices move: absmax and the code tables stay fp32 whatever dtype cast ``fn`` carries.
        weight = self.weight
        if isinstance(weight, NF4Tensor):
            self._quant = None
        elif self._quant.absmax.is_meta and not weight.is_meta:  # to_empty() of a meta-built layer: scales to fill
            empty = _empty_nf4(self.out_features, self.in_features, self.blocksize, self.double_quant, self._quant.dtype, weight.device)
            self._quant = empty.with_packed(weight)
        else:
            self._quant = self._quant.with_packed(weight)
        self._drop_group_round()  # a round's weights are on the old device
        return self

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the quantized weight, its statistics and the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.quant.nbytes + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )

    # -- state dict (bitsandbytes keys) -------------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        quant = self._synced_quant()
        for suffix, tensor in to_bnb_tensors(quant).items():
            key = prefix + "weight" + (f".{suffix}" if suffix else "")
            destination[key] = self.weight if (not suffix and keep_vars) else tensor.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
        missing_keys: list, unexpected_keys: list, error_msgs: list,
    ) -> None:
        name = prefix + "weight"
        if strict:  # as nn.Module does: a key under this prefix that no parameter or bnb tensor claims
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and not self._owns_key(k[len(prefix):]))
        if name not in state_dict:
            missing_keys.append(name)
        else:
            tensors = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".") and self._owns_key(k[len(prefix):])}
            tensors[""] = state_dict[name]
            try:
                self._load_weight(tensors, name)
            except NF4FormatError as err:
                error_msgs.append(str(err))
        self._load_bias(state_dict, prefix, missing_keys, error_msgs)

    def _owns_key(self, key: str) -> bool:
        """Whether ``key`` (relative to this layer) is one this layer loads: ``weight``, the bitsandbytes tensors
        under ``weight.`` (any ``quant_state.bitsandbytes__*`` blob, so a non-NF4 one gets its own error), and
        ``bias`` when the layer has one; keys of child modules are theirs, as in nn.Module."""
        from lightning_nf4.format.bnb_state import QUANT_STATE_PREFIX

        if key == "weight" or (key == "bias" and self.bias is not None):
            return True
        if key.startswith("weight."):
            suffix = key[len("weight."):]
            return suffix in ("absmax", "quant_map", "nested_absmax", "nested_quant_map") or suffix.startswith(QUANT_STATE_PREFIX)
        head, dot, _ = key.partition(".")
        return bool(dot) and head in self._modules

    def _load_weight(self, tensors: dict[str, Tensor], name: str) -> None:
        target = self.weight.device
        if isinstance(tensors[""], NF4Tensor):  # a state dict with keep_vars=True of the NF4Tensor form
            quant = tensors[""].quant
        elif is_bnb_quantized(tensors):
            quant = from_bnb_tensors(tensors, name)
        elif tensors[""].is_floating_point():
            extra = sorted(k for k in tensors if k)
            if extra:
                raise NF4FormatError(f"{name}: float weight given together with {extra} but no quant state; the checkpoint is corrupted.")
            weight = tensors[""].detach()
            if target.type != "meta":
                weight = weight.to(target)
            if self.stored_transposed:  # a Conv1D's float weight: [in_features, out_features]
                weight = weight.t().contiguous()
            quant = quantize_nf4(weight, self.blocksize, self.double_quant, name=name)
        else:
            raise NF4FormatError(
                f"{name} has dtype {tensors[''].dtype} but no '{name}.quant_state.bitsandbytes__nf4': a weight to quantize "
                "must be float, and a packed NF4 weight needs its quant state (absmax, quant_map, ...) saved alongside."
            )
        if tuple(quant.shape) != (self.out_features, self.in_features):
            raise NF4FormatError(
                f"size mismatch for {name}: checkpoint has shape {tuple(quant.shape)}, this layer is "
                f"[{self.out_features}, {self.in_features}] (out_features, in_features)."
            )
        if target.type != "meta":
            quant = quant.to(target)
        self._set_quant(quant)

    def _load_bias(self, state_dict: dict, prefix: str, missing_keys: list, error_msgs: list) -> None:
        key = prefix + "bias"
        if self.bias is None:
            return
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key].detach()
        if value.shape != self.bias.shape:
            error_msgs.append(f"size mismatch for {key}: checkpoint has shape {tuple(value.shape)}, this layer has {tuple(self.bias.shape)}.")
            return
        if self.bias.device.type == "meta":
            self.bias = nn.Parameter(value.to(self.bias.dtype), requires_grad=self.bias.requires_grad)
        else:
            with torch.no_grad():
                self.bias.copy_(value)


def set_low_memory_recompute(module: nn.Module, enabled: bool = True) -> int:
    """Turn ``NF4Linear.low_memory_recompute`` on (or off) for every NF4 layer in ``module``; returns how many.
    What a sharded strategy calls: its memory, not the host time of one more dequantize per weight, is the limit."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_low_memory_recompute: enabled must be True or False, got {enabled!r}.")
    layers = [m for m in module.modules() if isinstance(m, NF4Linear)]
    for layer in layers:
        layer.low_memory_recompute = enabled
    return len(layers)
