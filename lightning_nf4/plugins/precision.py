"""``NF4Precision``: a Lightning precision plugin that turns a model's linears into frozen NF4 layers.

Lightning calls ``convert_module`` in ``strategy.setup``, before moving the model and before
``configure_optimizers``; quantizing there means the optimizer never sees a float base weight. The
autocast and gradient-scaling behaviour is Lightning's own ``MixedPrecision``, on the root device's
type (cpu, cuda or xpu) rather than a hard-coded "cuda".
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_nf4.devices import parse_device, unavailable_reason
from lightning_nf4.format.quantized import check_blocksize, float_dtype
from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.kernels import ops
from lightning_nf4.layers.group import group_nf4_layers
from lightning_nf4.layers.linear import NF4Linear, set_low_memory_recompute
from lightning_nf4.plugins.convert import (
    adopt_peft_linears, check_peft_layers, convert_experts, convert_linears, convertible_experts, convertible_linears, exclude_nf4_from_ddp_sync, nf4_layers,
    kept_in_float_by_model, nf4_expert_weights,
)

_PRECISION_NAMES = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed", torch.float32: "32-true"}


class NF4PrecisionError(RuntimeError):
    """A configuration NF4Precision cannot train with; the message says how to fix it."""


class NF4Conversion:
    """What both NF4 precision plugins share: their arguments, the conversion of a model's linears, the autocast
    and the init contexts. Mixed in before Lightning's ``MixedPrecision`` (Trainer's or Fabric's), whose
    scaler and backward it keeps; see ``NF4Precision`` for the arguments."""

    _build_hint = "Build the model in __init__ or configure_model,"

    def __init__(
        self,
        compute_dtype: Union[torch.dtype, str] = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
        skip_modules: Sequence[str] = ("lm_head",),
        device: Optional[str] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        group_dequantize: Union[bool, str] = "auto",
        low_memory_recompute: Union[bool, str] = "auto",
        offload_activations: bool = False,
    ) -> None:
        compute_dtype = float_dtype(compute_dtype) or compute_dtype
        if compute_dtype not in _PRECISION_NAMES:
            raise NF4PrecisionError(f"compute_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {compute_dtype!r}.")
        if device is not None:
            _check_device(device, type(self).__name__)
        if scaler is not None and compute_dtype != torch.float16:
            raise NF4PrecisionError(
                f"{type(self).__name__}(compute_dtype={compute_dtype}, scaler=...): a GradScaler is for float16 compute only (Lightning's "
                "'bf16-mixed' refuses one too); leave scaler out, or use compute_dtype=torch.float16."
            )
        mixed = "16-mixed" if compute_dtype == torch.float16 else "bf16-mixed"
        super().__init__(mixed, device=device or "cpu", scaler=scaler)
        self._user_scaler = scaler is not None
        self.precision = _PRECISION_NAMES[compute_dtype]  # type: ignore[assignment]
        self.compute_dtype = compute_dtype
        self.blocksize = check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise NF4PrecisionError(f"double_quant must be True or False, got {double_quant!r}.")
        self.double_quant = double_quant
        if isinstance(skip_modules, str):
            skip_modules = (skip_modules,)  # one name, as a list
        if not isinstance(skip_modules, Sequence) or not all(isinstance(name, str) for name in skip_modules):
            raise NF4PrecisionError(f"skip_modules must be a module name or a list of names (() for none), got {skip_modules!r}.")
        self.skip_modules = tuple(skip_modules)
        self._device_given = device is not None
        if group_dequantize not in (True, False, "auto"):
            raise NF4PrecisionError(f"group_dequantize must be True, False or 'auto', got {group_dequantize!r}.")
        self.group_dequantize = group_dequantize
        if not (isinstance(low_memory_recompute, bool) or low_memory_recompute == "auto"):
            raise NF4PrecisionError(f"low_memory_recompute must be True, False or 'auto', got {low_memory_recompute!r}.")
        self.low_memory_recompute = low_memory_recompute
        if not isinstance(offload_activations, bool):
            raise NF4PrecisionError(f"offload_activations must be True or False, got {offload_activations!r}.")
        self.offload_activations = offload_activations
        self._post_convert: list[Callable[[nn.Module], None]] = []
        # the float weights conversion replaced (by id: tensors compare elementwise), for optimizer checks
        self._replaced: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_replaced"] = None  # weak references do not pickle (ddp_spawn sends the plugin to each process)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._replaced = weakref.WeakValueDictionary()

    # -- device -----------------------------------------------------------------------------
    def _resolve_device(self, module: nn.Module) -> torch.device:
        if self._device_given:
            return torch.device(self.device)
        trainer = getattr(module, "_trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        param = next(module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _bind_device(self, device: torch.device) -> None:
        if device.type == "meta":
            return
        self.device = device.type
        if self.compute_dtype == torch.float16 and not self._user_scaler and getattr(self.scaler, "_device", None) != device.type:
            # the default one follows the training device, and keeps its scale from one fit to the next as Lightning's does
            self.scaler = torch.amp.GradScaler(device=device.type)
        if self.compute_dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise NF4PrecisionError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; use NF4Precision(compute_dtype=torch.float16).")

    # -- Lightning hooks --------------------------------------------------------------------
    def pending_conversion(self, module: nn.Module) -> set[str]:
        """Names of the linears (and experts modules) ``convert_module`` would quantize now (none when the module keeps
        a float base)."""
        if not wants_4bit(module):
            return set()
        skip = self._skip(module)
        return {name for name, _ in convertible_linears(module, skip)} | {name for name, _, _ in convertible_experts(module, skip)}

    def _skip(self, module: nn.Module) -> tuple[str, ...]:
        """``skip_modules``, and the modules a transformers model keeps in float32 (``_keep_in_fp32_modules``), which
        transformers + bitsandbytes leaves unquantized as well."""
        return (*self.skip_modules, *kept_in_float_by_model(module))

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize every convertible ``nn.Linear`` and stacked MoE expert weight on the training device; idempotent. A module whose
        ``load_in_4bit`` (attribute or hyperparameter, as ``CausalLMModule`` has) is False keeps a float base:
        the same config then runs the bf16 LoRA baseline, with this plugin's autocast."""
        device = self._resolve_device(module)
        self._bind_device(device)
        self._read_deferred(module, device)
        if not wants_4bit(module):
            rank_zero_info(f"{type(self).__name__}: {type(module).__name__}.load_in_4bit is False; the base weights stay in float.")
            return self._after_convert(module)
        skip = self._skip(module)
        pending = convertible_linears(module, skip)
        experts = convertible_experts(module, skip)
        loaded, stacked = nf4_layers(module), nf4_expert_weights(module)
        if not pending and not loaded and not experts and not stacked:
            raise NF4PrecisionError(
                f"{type(module).__name__} has no nn.Linear layer to quantize (skip_modules={list(self.skip_modules)}). "
                f"{self._build_hint} or drop {type(self).__name__} for this model."
            )
        check_peft_layers(module, {name for name, _ in pending} | {name for name, _, _ in experts})
        self._adopt_compute_dtype(loaded, stacked)
        self._note_loaded_quantization(loaded, stacked)
        self._replaced.update((id(layer.weight), layer.weight) for _, layer in pending)
        self._replaced.update((id(getattr(owner, attr)), getattr(owner, attr)) for _, owner, attr in experts)
        if pending or experts:
            before = _param_bytes(module)
            kwargs = dict(blocksize=self.blocksize, double_quant=self.double_quant, compute_dtype=self.compute_dtype, skip_modules=skip, device=device)
            count = convert_linears(module, **kwargs)
            count_experts = convert_experts(module, **kwargs)
            after = _param_bytes(module)
            what = f"{count} linear layers" + (f" and {count_experts} stacked expert weights" if count_experts else "")
            rank_zero_info(f"{type(self).__name__}: quantized {what} on {device}: parameters {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB.")
        adopt_peft_linears(module)
        exclude_nf4_from_ddp_sync(module)
        if self.group_dequantize is True or (self.group_dequantize == "auto" and ops.launches_kernels(device.type)):
            group_nf4_layers(module)
        if self.low_memory_recompute != "auto":
            set_low_memory_recompute(module, self.low_memory_recompute)
        return self._after_convert(module)

    def _adopt_compute_dtype(self, loaded: list[tuple[str, NF4Linear]], stacked: Sequence[tuple[str, Any]] = ()) -> None:
        """NF4 layers that came quantized (a loader's ``bnb_4bit_compute_dtype``) compute in this plugin's dtype, as
        Lightning's ``BitsandbytesPrecision`` sets it on bitsandbytes' layers; NF4 expert weights dequantize to it."""
        other = sorted({str(layer.compute_dtype) for _, layer in loaded if layer.compute_dtype != self.compute_dtype})
        other += sorted({str(p.dtype) for _, p in stacked if p.dtype != self.compute_dtype} - set(other))
        if other:
            rank_zero_info(f"{type(self).__name__}: {len(loaded) + len(stacked)} NF4 weights computed in {', '.join(other)}; now in {self.compute_dtype}.")
        for _, layer in loaded:
            layer.compute_dtype = self.compute_dtype
        for _, param in stacked:
            if param.dtype != self.compute_dtype:
                param.data = NF4Tensor(param.quant, dtype=self.compute_dtype, transposed=param.transposed)

    def _note_loaded_quantization(self, loaded: list[tuple[str, NF4Linear]], stacked: Sequence[tuple[str, Any]]) -> None:
        """Weights that came quantized keep their blocks: say so once when this plugin was asked for others (its
        ``double_quant=False`` does nothing to a model loaded with double quantization)."""
        from torch.distributed.tensor import DTensor

        settings = [(layer.blocksize, layer.double_quant) for _, layer in loaded]  # read without gathering a sharded layer
        for _, param in stacked:
            quant = (param.to_local() if isinstance(param, DTensor) else param).quant
            settings.append((quant.blocksize, quant.double_quant))
        other = sorted(set(settings) - {(self.blocksize, self.double_quant)})
        if other and not self.__dict__.get("_noted_loaded"):
            self._noted_loaded = True
            rank_zero_warn(
                f"{type(self).__name__}(blocksize={self.blocksize}, double_quant={self.double_quant}) applies to the weights it "
                f"quantizes; {len(settings)} NF4 weights came quantized with (blocksize, double_quant) in {other} and stay so. "
                "To change them, load the model with BitsAndBytesConfig(bnb_4bit_use_double_quant=...) or in float."
            )

    def _read_deferred(self, module: nn.Module, device: torch.device) -> None:
        """A model from ``from_pretrained(..., device="meta")`` holds no weights yet. ``NF4FSDPStrategy`` reads it unit
        by unit as it shards; under any other strategy (and Fabric) it is read whole here, onto the training device,
        before the strategy moves the model (which fails on ``meta``)."""
        from lightning_nf4.strategies.fsdp import NF4FSDPStrategy, read_deferred  # the strategy reads as it shards

        strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
        if isinstance(strategy, NF4FSDPStrategy) or device.type == "meta":
            return
        if read_deferred(module, device):
            rank_zero_info(f"{type(self).__name__}: read the model loaded with device='meta' onto {device} "
                           "(strategy='nf4_fsdp' reads it shard by shard instead).")

    def apply_low_memory_recompute(self, module: nn.Module, default: bool) -> None:
        """For a strategy: set ``low_memory_recompute`` on ``module``'s NF4 layers, to the value this plugin was
        given, or to the strategy's ``default`` where that is "auto"."""
        set_low_memory_recompute(module, default if self.low_memory_recompute == "auto" else self.low_memory_recompute)

    def _after_convert(self, module: nn.Module) -> nn.Module:
        hooks, self._post_convert = self._post_convert, []
        for hook in hooks:
            hook(module)
        return module

    def add_post_convert_hook(self, hook: Callable[[nn.Module], None]) -> None:
        """Run ``hook(module)`` once, right after the next conversion (used by LoRACallback)."""
        self._post_convert.append(hook)

    def autocast_context_manager(self) -> Any:
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device, dtype=self.compute_dtype, cache_enabled=False)

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Autocast, and with ``offload_activations`` the saved tensors' trip to host memory (when grad is on)."""
        with self.autocast_context_manager():
            if self.offload_activations and torch.is_grad_enabled():
                from lightning_nf4.layers.offload import offload_activations

                with offload_activations():
                    yield
            else:
                yield

    @contextmanager
    def module_init_context(self) -> Generator[None, None, None]:
        """Models built in ``configure_model`` start in the compute dtype, not float32."""
        with _default_dtype(self.compute_dtype):
            yield

    @contextmanager
    def tensor_init_context(self) -> Generator[None, None, None]:
        with _default_dtype(self.compute_dtype):
            yield


class NF4Precision(NF4Conversion, MixedPrecision):
    """QLoRA precision: NF4 base weights, computation in ``compute_dtype`` under autocast.

    Args:
        compute_dtype: dtype of the matmuls (bfloat16 default; float16 adds a GradScaler; float32 no autocast).
        blocksize: NF4 block size (64 as in QLoRA and bitsandbytes).
        double_quant: quantize the per-block scales too (about 0.37 bits per weight saved).
        skip_modules: module names or patterns left in float (``lm_head`` by default, as transformers does).
        device: where to quantize and autocast; by default the trainer's root device.
        group_dequantize: dequantize the NF4 weights of each decoder layer together, in one kernel launch
            (``lightning_nf4.layers.group``); results are identical either way. "auto" (default): on GPUs,
            where each launch costs host time, not on CPU, where it only holds a layer's weights longer.
        low_memory_recompute: under activation checkpointing, keep no dequantized weight from a layer's recompute
            to its backward, which dequantizes each weight again, one at a time (``NF4Linear.low_memory_recompute``):
            a decoder layer's dequantized weights less at the peak, for one more dequantize per weight and step.
            "auto" (default): the strategy decides (on under ``NF4FSDPStrategy``, off on one device and DDP).
        offload_activations: keep the tensors a training step saves for its backward in pinned host memory
            from forward to backward (``lightning_nf4.layers.offload``). Under activation checkpointing these are
            the decoder layers' inputs: at Llama-3-8B shape and 2048 tokens 0.5 GiB less on the device, for one
            copy out and one back per layer, issued without waiting. Off by default.
        scaler: the ``torch.amp.GradScaler`` for float16 compute (by default one on the training device); refused
            with another compute dtype, as Lightning's ``MixedPrecision`` refuses it.
    """

    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list) -> tuple[nn.Module, list, list]:
        """Refuse optimizers that hold a frozen NF4 weight (they would silently do nothing or fail)."""
        packed = {id(layer.weight): name for name, layer in nf4_layers(model)}
        for optimizer in optimizers:
            for group in getattr(optimizer, "param_groups", []):
                hits = [packed[id(p)] for p in group["params"] if id(p) in packed]
                if hits:
                    raise NF4PrecisionError(
                        f"The optimizer holds the frozen NF4 weights of {hits[:3]}{'...' if len(hits) > 3 else ''}. "
                        "Pass only trainable parameters, e.g. "
                        "torch.optim.AdamW(p for p in self.parameters() if p.requires_grad)."
                    )
        return super().connect(model, optimizers, lr_schedulers)

    def pre_backward(self, tensor: torch.Tensor, module: Any) -> torch.Tensor:
        if getattr(module, "_trainer", None) is None:  # Fabric calls this with its own module, or None
            raise NF4PrecisionError(
                "NF4Precision is the Trainer's plugin, and this backward comes from outside a Trainer (Lightning Fabric?). "
                "With Fabric use lightning_nf4.NF4FabricPrecision, which takes the same arguments: "
                "Fabric(plugins=NF4FabricPrecision())."
            )
        return super().pre_backward(tensor, module)


def wants_4bit(module: nn.Module) -> bool:
    """False when the module asks for a float base: ``load_in_4bit`` False as an attribute or a hyperparameter."""
    flag = getattr(module, "load_in_4bit", None)
    if flag is None:
        flag = getattr(module, "hparams", {}).get("load_in_4bit")
    return flag is not False


def _check_device(device: str, plugin: str) -> None:
    """A device given by name must exist here: otherwise torch fails later, deep inside, with a bare assertion."""
    try:
        reason = unavailable_reason(parse_device(device))
    except ValueError as err:
        raise NF4PrecisionError(f"{plugin}(device={device!r}): not a torch device; use e.g. 'cpu', 'cuda', 'cuda:1' or 'xpu'.") from err
    if reason is not None:
        raise NF4PrecisionError(f"{plugin}(device={device!r}), but {reason}; or leave device unset to follow the accelerator.")


def _param_bytes(module: nn.Module) -> int:
    total = 0
    for sub in module.modules():
        if isinstance(sub, NF4Linear):
            total += sub.memory_bytes
            continue
        for p in sub.parameters(recurse=False):
            total += p.quant.nbytes if isinstance(p, NF4Tensor) else p.numel() * p.element_size()
    return total


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Generator[None, None, None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
