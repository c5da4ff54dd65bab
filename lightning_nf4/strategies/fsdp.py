"""``NF4FSDPStrategy``: sharded QLoRA, FSDP2 (``fully_shard``) over NF4 base weights, under Lightning.

Built on Lightning's ``ModelParallelStrategy`` (FSDP2), not ``FSDPStrategy`` (FSDP1): FSDP1 flattens each
unit's parameters into one float ``FlatParameter``, which cannot hold packed uint8 codes with their scales
(bitsandbytes #1424/#1945), while FSDP2 keeps parameters separate and lets a parameter's type shard and
all-gather itself. Here every NF4 weight becomes an ``NF4Tensor`` (``lightning_nf4.format.tensor``): rows
shard with their scales, the packed bytes are gathered as bytes, never cast by a mixed-precision policy.

What it does in ``setup``, after the precision plugin has converted the model and ``LoRACallback`` has
injected its adapters: for each sharding unit (by default a transformers model's decoder layer class),
materialize it if it was built on the meta device (quantizing as it goes; a model from
``from_pretrained(..., device="meta")`` is read from its checkpoint instead), move it to this rank's device
and ``fully_shard`` it, so at most one unit is ever whole on a rank; then the input embeddings, the backbone (its final norm) and
the root (``lm_head``). Checkpoints hold the trainable weights, consolidated on rank 0 (adapter-only by default).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_info
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_nf4.format.tensor import NF4Tensor, check_shardable
from lightning_nf4.layers.group import find_by_class, persistent_buffers, repeated_blocks
from lightning_nf4.layers.linear import NF4Linear


class NF4ShardingConfigError(MisconfigurationException):
    """A sharded-QLoRA configuration that cannot run; the message names the fix."""


# Models this strategy sharded (a second fit or a validate with the same model finds them sharded already)
_SHARDED_HERE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def has_sharded_parameters(module: nn.Module) -> bool:
    """True once FSDP2 has sharded any of ``module``'s parameters (they are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def find_sharding_units(module: nn.Module, units: Union[str, Sequence[Union[str, type]]] = "auto") -> list[nn.Module]:
    """The submodules to shard one by one, outermost first and in module order.

    ``"auto"``: the classes a transformers model lists in ``_no_split_modules`` (its decoder layer), else the
    elements of the model's outermost ``nn.ModuleList``. Otherwise class names or classes.
    """
    if units == "auto":
        return repeated_blocks(module)
    wanted = [units] if isinstance(units, (str, type)) else list(units)
    found = find_by_class(module, wanted)
    if not found:
        classes = sorted({type(m).__name__ for m in module.modules()})
        raise NF4ShardingConfigError(
            f"sharding_units={[w if isinstance(w, str) else w.__name__ for w in wanted]} matched no module of "
            f"{type(module).__name__}. Module classes present: {classes[:20]}. Name the decoder layer class, or use 'auto'."
        )
    return found


class NF4FSDPStrategy(ModelParallelStrategy):
    """Fully sharded data parallel QLoRA (FSDP2): each rank holds 1/N of every NF4 weight and float part.

    Args:
        sharding_units: modules sharded (and all-gathered) one at a time: ``"auto"`` (a transformers model's
            decoder layer class, else the outermost ``ModuleList``'s elements), or class names / classes.
        activation_checkpointing: recompute each unit's activations in backward (FSDP all-gathers the unit's
            shards again for the recompute and frees them after).
        cpu_offload: keep the sharded parameters (the NF4 bytes and the LoRA weights) in host memory between
            uses; FSDP copies them in for each unit's forward and backward, and steps the optimizer on the CPU.
        reshard_after_forward: free each unit's gathered weights after its forward (True: least memory) or keep
            them for the backward (False: one all-gather less per unit and step).
        prefetch: how many units ahead each unit's all-gather is issued, in forward and in backward (units
            run in module order); 0 leaves it to FSDP2, which issues a unit's gather only when the host
            reaches that unit, too late to overlap when the host does not run ahead of the device.
        mixed_precision: an FSDP2 ``MixedPrecisionPolicy`` for the float parameters; default none (LoRA weights
            are gathered in float32 and computed under the precision plugin's autocast, as on one device).
        layers_per_unit: consecutive sharding units gathered together as one FSDP unit (``fully_shard`` of a
            list): fewer, larger collectives and fewer hook calls per step, for one more layer's weights whole.
        shard_adapters: shard the trainable (LoRA) weights with the frozen ones (True: least memory), or keep them
            whole on every rank (False): units then hold only frozen weights, so backward has no per-unit
            gradient reduce-scatter, and the gradients are averaged in one all-reduce after backward, as DDP
            does. Costs the adapters' weights, gradients and optimizer state whole on every rank.
        process_group_backend: default ``nccl`` on CUDA, ``xccl`` on XPU, ``gloo`` on CPU.
        vocab_parallel: keep the input embeddings and output head split by vocabulary rows, never gathered
            (``lightning_nf4.strategies.vocab_parallel``): ``"auto"`` when both are frozen, untied and split evenly
            (the LoRA case), True (an error if they cannot), False (``fully_shard`` units, gathered for use).
    """

    strategy_name = "nf4_fsdp"

    def __init__(
        self,
        sharding_units: Union[str, Sequence[Union[str, type]]] = "auto",
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        prefetch: int = 1,
        mixed_precision: Optional[Any] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        vocab_parallel: Union[bool, str] = "auto",
        layers_per_unit: int = 1,
        shard_adapters: bool = True,
    ) -> None:
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
            process_group_backend=process_group_backend, timeout=timeout,
        )
        self.sharding_units = sharding_units
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        if not isinstance(prefetch, int) or prefetch < 0:
            raise NF4ShardingConfigError(f"prefetch={prefetch!r}: give a number of units, 0 or more (1 is usual).")
        self.prefetch = prefetch
        self.mixed_precision = mixed_precision
        if not isinstance(layers_per_unit, int) or isinstance(layers_per_unit, bool) or layers_per_unit < 1:
            raise NF4ShardingConfigError(f"layers_per_unit={layers_per_unit!r}: give a whole number of layers, 1 or more (1 is usual).")
        self.layers_per_unit = layers_per_unit
        self.shard_adapters = bool(shard_adapters)
        self._replicated: list[nn.Parameter] = []
        if vocab_parallel not in (True, False, "auto"):
            raise NF4ShardingConfigError(f"vocab_parallel={vocab_parallel!r}: give True, False or 'auto'.")
        self.vocab_parallel = vocab_parallel

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        description = "FSDP2 over NF4 base weights (sharded QLoRA)"
        strategy_registry.register("nf4_fsdp", cls, description=description, override=True)
        strategy_registry.register("fsdp2", cls, description=description, override=True)
        strategy_registry.register(
            "nf4_fsdp_cpu_offload", cls, description=description + ", sharded weights offloaded to the CPU", cpu_offload=True, override=True
        )

    # -- processes and mesh ----------------------------------------------------------------------
    def _get_process_group_backend(self) -> str:
        from lightning_nf4.strategies.xpu_ddp import xccl_backend

        return self._process_group_backend or xccl_backend(self.root_device) or super()._get_process_group_backend()

    def setup_environment(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self._setup_distributed()
        self._data_parallel_size, self._tensor_parallel_size = self.world_size, 1
        # Not set on the LightningModule yet (Lightning's ModelParallelStrategy does): PEFT reads a model's
        # ``_device_mesh`` as a tensor-parallel plan while injecting LoRA. ``setup`` sets it once injected.
        self._device_mesh = init_device_mesh(self.root_device.type, (self.world_size,), mesh_dim_names=("data_parallel",))

    # -- sharding --------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        self._check_precision()
        if not has_sharded_parameters(self.model):
            self.model = self.precision_plugin.convert_module(self.model)
            self.shard(self.model)
            apply = getattr(self.precision_plugin, "apply_low_memory_recompute", None)
            if apply is not None:  # sharding is for memory: the recompute keeps no dequantized layer, unless told otherwise
                apply(self.model, default=True)
        elif self.model not in _SHARDED_HERE:
            raise NF4ShardingConfigError(
                f"{type(self.model).__name__}'s parameters are already sharded (fully_shard in configure_model?). NF4FSDPStrategy "
                "shards the model itself, after the precision plugin has quantized its linears and LoRA is injected; a model "
                "sharded before that would train in float, without NF4 or LoRA. Build the model in configure_model (on meta "
                "if you like) without fully_shard, and choose the units with NF4FSDPStrategy(sharding_units=...)."
            )
        self.model_to_device()
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def model_to_device(self) -> None:
        """What sharding left where it was (modules without parameters: torchmetrics' metrics, buffers) goes to
        the root device, as Lightning's strategies move the rest of a model; parameters stay where sharding (and
        CPU offload) put them, so this is not ``model.to(device)``."""
        assert self.model is not None
        move_unsharded_state(self.model, self.root_device)

    def _check_precision(self) -> None:
        from lightning.pytorch.plugins.precision import BitsandbytesPrecision, FSDPPrecision

        if isinstance(self.precision_plugin, (BitsandbytesPrecision, FSDPPrecision)):
            raise NF4ShardingConfigError(
                f"NF4FSDPStrategy does not run with {type(self.precision_plugin).__name__}: use "
                "plugins=NF4Precision() for NF4 base weights (or precision='bf16-mixed' for a float base)."
            )

    def shard(self, module: nn.Module) -> nn.Module:
        """Materialize (if on meta), move and ``fully_shard`` each unit in turn, then the root."""
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh
        world = mesh.size()
        device = self.root_device
        units = find_sharding_units(module, self.sharding_units)
        if world > 1:
            for name, layer in module.named_modules():
                if isinstance(layer, NF4Linear):
                    check_shardable(layer._synced_quant(), world, name=f"{name}.weight")
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        kwargs["mp_policy"] = self.mixed_precision or MixedPrecisionPolicy()
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        # The roots are the LightningModule's children, not the LightningModule itself: FSDP2 gathers a root's
        # own parameters in its forward, and Lightning calls training_step, not forward.
        if any(True for _ in module.parameters(recurse=False)):
            raise NF4ShardingConfigError(
                f"{type(module).__name__} holds parameters directly ({[n for n, _ in module.named_parameters(recurse=False)][:3]}); "
                "NF4FSDPStrategy shards the LightningModule's submodules. Move them into a submodule (e.g. self.model)."
            )
        from lightning_nf4.export import find_hf_model

        hf = find_hf_model(module)[1]
        inits = peft_inits(module)

        def shard_one(target: Union[nn.Module, list[nn.Module]], checkpointed: bool) -> None:
            targets = target if isinstance(target, list) else [target]
            for one in targets:
                _materialize(one, device, hf, inits)
                _prepare_nf4(one)
                if checkpointed:
                    from torch.distributed._composable import checkpoint

                    checkpoint(one)
            options = dict(kwargs)
            if not self.shard_adapters:  # FSDP leaves them alone; post_backward averages their gradients
                kept = {p for one in targets for m in own_modules(one, FSDPModule) for p in m.parameters(recurse=False) if p.requires_grad}
                options["ignored_params"] = kept | set(kwargs.get("ignored_params") or ())
            fully_shard(target, **options)

        if self.activation_checkpointing:
            without_kv_cache(hf)
        unit_class = type(units[0]).__name__ if units else ""
        groups = [units[i:i + self.layers_per_unit] for i in range(0, len(units), self.layers_per_unit)]
        for group in groups:
            shard_one(group if len(group) > 1 else group[0], self.activation_checkpointing)
        units = [group[0] for group in groups]  # each group's first module carries the group's FSDP state
        if self.prefetch:
            for i, unit in enumerate(units):
                unit.set_modules_to_forward_prefetch(units[i + 1:i + 1 + self.prefetch])
                unit.set_modules_to_backward_prefetch(units[max(0, i - self.prefetch):i][::-1])
        # The input embeddings as a unit of their own: inside the root they would stay gathered (whole) from the
        # start of forward to the end of backward, as FSDP2 never reshards a root after its forward.
        from lightning_nf4.strategies.vocab_parallel import shard_by_vocabulary, vocabulary_tables

        by_vocabulary = vocabulary_tables(hf, world, self.vocab_parallel, cpu_offload=self.cpu_offload)
        if by_vocabulary is not None:  # frozen, untied: each rank keeps its rows; the units holding them ignore them
            for table in by_vocabulary:
                _materialize(table, device, hf, inits)
            kwargs["ignored_params"] = shard_by_vocabulary(by_vocabulary, mesh)
        tables = _vocabulary_modules(hf) if by_vocabulary is None else []
        for table in tables:
            shard_one(table, False)
            if not any(p.requires_grad for p in table.parameters()) and hasattr(table, "set_unshard_in_backward"):
                # A frozen table's backward reads nothing of it: without this FSDP2 gathers it whole (1 GiB at
                # Llama-3 shape) once more at the end of every backward, for no gradient.
                table.set_unshard_in_backward(False)
        backbone = _backbone_unit(hf)
        if backbone is not None:
            shard_one(backbone, False)
        for child in module.children():
            if next(child.parameters(), None) is not None and not isinstance(child, FSDPModule):
                shard_one(child, False)
        if not self.shard_adapters:  # whole on every rank, in module order: the same values everywhere, rank 0's (as DDP does)
            from torch.distributed.tensor import DTensor

            self._replicated = [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
            if self._replicated and world > 1:
                with torch.no_grad():
                    _flat_collective([p.data for p in self._replicated], lambda flat: torch.distributed.broadcast(flat, src=0, group=mesh.get_group()))
        from lightning_nf4.loading.deferred import deferred_checkpoint

        source = deferred_checkpoint(hf)
        filled = f", each filled from {source.index.files[0].parent} as it was sharded" if source is not None else ""
        _SHARDED_HERE.add(module)
        parts = [f"{len(units)} {unit_class} units"] if units else []
        parts += ["the embeddings and head by vocabulary rows"] if by_vocabulary else [f"{len(tables)} embedding unit(s)"] if tables else []
        rank_zero_info(f"NF4FSDPStrategy: sharded {', '.join(parts) + ' and ' if parts else ''}the root across {world} ranks{filled}.")
        return module

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """With ``shard_adapters=False``: average the whole adapters' gradients over the ranks, in one flat
        all-reduce. Averaging a gradient that is already the same on every rank leaves it unchanged, so this is
        right after every micro-batch of gradient accumulation too."""
        super().post_backward(closure_loss)
        grads = [p.grad for p in self._replicated if p.grad is not None]
        if not grads or self.world_size == 1:
            return

        def average(flat: torch.Tensor) -> None:
            torch.distributed.all_reduce(flat, group=self.device_mesh.get_group())
            flat.div_(self.world_size)

        _flat_collective(grads, average)

    # -- checkpoints: the trainable weights and the buffers, consolidated ------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable parameters, whole, and the persistent buffers (a norm's running statistics), on rank 0
        (every rank takes part in the gathers)."""
        assert self.lightning_module is not None
        state = full_trainable_state(self.lightning_module)
        return state if self.global_rank == 0 else {}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer state, whole and keyed by parameter name, on rank 0 (a collective)."""
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        from lightning.pytorch.strategies.strategy import Strategy
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        path = Path(self.broadcast(checkpoint_path))
        checkpoint = Strategy.load_checkpoint(self, path, weights_only=weights_only)
        assert self.lightning_module is not None
        load_full_state(self.lightning_module, checkpoint["state_dict"], strict=False)
        if "optimizer_states" in checkpoint and self.optimizers:  # Lightning leaves this to the strategy here
            options = StateDictOptions(full_state_dict=True, cpu_offload=False)
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
                set_optimizer_state_dict(self.model, optimizer, self._by_name(optimizer, state), options=options)
        return checkpoint

    def _by_name(self, optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
        """An optimizer state keyed by parameter index (``optimizer.state_dict()``: a DDP or one-process checkpoint)
        keyed by parameter name instead, as FSDP2's loader reads it; the names in the optimizer's own order come from
        its current (empty) state. A state keyed by name already comes back as it is."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        saved_groups = state.get("param_groups", [])
        if not any(isinstance(p, int) for group in saved_groups for p in group.get("params", [])):
            return state
        # every rank needs the names: no cpu_offload, which leaves the full state on rank 0 only
        current = get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        names = [group["params"] for group in current["param_groups"]]
        if [len(n) for n in names] != [len(group["params"]) for group in saved_groups]:
            raise NF4ShardingConfigError(
                f"The checkpoint's optimizer state has parameter groups of {[len(g['params']) for g in saved_groups]} "
                f"parameters, this run's optimizer {[len(n) for n in names]}: it was written for other trainable weights "
                "(another LoRA configuration or model). Resume with the settings that wrote it."
            )
        by_name: dict[str, Any] = {}
        groups = []
        for fqns, group in zip(names, saved_groups):
            for fqn, index in zip(fqns, group["params"]):
                if index in state["state"]:
                    by_name[fqn] = state["state"][index]
            groups.append({**group, "params": list(fqns)})
        return {"state": by_name, "param_groups": groups}


def _vocabulary_modules(hf: Optional[nn.Module]) -> list[nn.Module]:
    """A transformers model's input embeddings, unless tied to the output head (FSDP2 keeps a shared parameter
    in one unit) or already inside a unit. The head stays in the root: a loss that applies its weight after
    the model's forward (``lightning_nf4.losses``) finds it gathered there."""
    from torch.distributed.fsdp import FSDPModule

    if hf is None or not callable(getattr(hf, "get_input_embeddings", None)):
        return []
    embeddings = hf.get_input_embeddings()
    head = hf.get_output_embeddings() if callable(getattr(hf, "get_output_embeddings", None)) else None
    if not isinstance(embeddings, nn.Module) or next(embeddings.parameters(), None) is None:
        return []
    if head is not None and {id(p) for p in embeddings.parameters()} & {id(p) for p in head.parameters()}:
        return []  # tied
    inside = {id(m) for unit in hf.modules() if isinstance(unit, FSDPModule) for m in unit.modules()}
    return [] if id(embeddings) in inside else [embeddings]


def _backbone_unit(hf: Optional[nn.Module]) -> Optional[nn.Module]:
    """A transformers model's backbone (``base_model``: the final norm, once its layers and embeddings are units)
    as a unit of its own, so that the root holds only the output head. The backbone's output then carries
    FSDP's pre-backward hook, which gathers the norm again for its backward, and a loss that reads the head's
    weight after the forward can let the head go before backward (``lightning_nf4.losses``). Not when the
    head shares its weight with a table inside the backbone (tied): FSDP2 keeps a shared parameter in one unit."""
    from torch.distributed.fsdp import FSDPModule

    backbone = getattr(hf, "base_model", None)
    if hf is None or not isinstance(backbone, nn.Module) or backbone is hf or isinstance(backbone, FSDPModule):
        return None
    head = hf.get_output_embeddings() if callable(getattr(hf, "get_output_embeddings", None)) else None
    if head is None or {id(p) for p in head.parameters()} & {id(p) for p in backbone.parameters()}:
        return None
    return backbone


def _flat_collective(tensors: list[torch.Tensor], collective: Any) -> None:
    """Run one in-place ``collective`` over ``tensors`` packed into one flat buffer, and copy the result back: one
    call for many small tensors, in the same order on every rank."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    collective(flat)
    for tensor, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(value)


def without_kv_cache(hf: Optional[nn.Module]) -> bool:
    """Turn a transformers model's KV cache off for checkpointed training, as ``gradient_checkpointing_enable``
    does: the cache would keep each recompute's keys, values and the graph behind them (the layer's dequantized
    weights) to the end of the step. Returns whether it was on."""
    config = getattr(hf, "config", None)
    if not getattr(config, "use_cache", False):
        return False
    config.use_cache = False  # type: ignore[union-attr]
    return True


def full_trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, and every persistent buffer (never sharded), on the CPU: a collective, so
    every rank must call it."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            value = param.full_tensor() if isinstance(param, DTensor) else param
            out[name] = value.detach().cpu()
    for name, buffer in persistent_buffers(module).items():
        out[name] = buffer.detach().cpu()
    return out


def load_full_state(module: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy whole tensors into (possibly sharded) parameters, each rank keeping its own rows, and into the
    persistent buffers. No communication."""
    params, buffers = dict(module.named_parameters()), persistent_buffers(module)
    unexpected = sorted(set(state) - set(params) - set(buffers))
    if strict and unexpected:
        raise RuntimeError(f"unexpected keys in the checkpoint: {unexpected[:5]}")
    base = [n for n in state if n in params and _is_nf4_weight(params[n])]
    if base:
        raise NF4ShardingConfigError(
            f"The checkpoint holds the whole model's NF4 base ({base[0]} and {len(base) - 1} more): a full checkpoint of "
            "one process or DDP (LoRACallback(full_checkpoint=True), ModelCheckpoint(save_weights_only=True)). nf4_fsdp "
            "takes the base from the model's own weights and resumes from adapter-only checkpoints (LoRACallback's "
            "default); resume this one without nf4_fsdp, or load it with lightning_nf4.load_from_checkpoint and export."
        )
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                copy_full_into(params[name], value, name)
            elif name in buffers:
                copy_full_into(buffers[name], value, name)


def _is_nf4_weight(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    local = param.to_local() if isinstance(param, DTensor) else param
    return isinstance(local, NF4Tensor)


def copy_full_into(param: torch.Tensor, value: torch.Tensor, name: str = "parameter") -> None:
    """``param.copy_(value)`` for a plain or FSDP-sharded ``param`` and a whole ``value``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(param.shape) != tuple(value.shape):
        raise RuntimeError(f"size mismatch for {name}: checkpoint {tuple(value.shape)}, model {tuple(param.shape)}")
    if isinstance(param, DTensor):
        local = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(value)


def _materialize(module: nn.Module, device: torch.device, hf: Optional[nn.Module], inits: Optional[dict[str, Any]] = None) -> None:
    """Give a meta-built module (not its already-sharded children) storage on ``device`` and its values: read
    from the checkpoint of a model loaded with ``from_pretrained(..., device="meta")``, else initial values
    (``hf``'s ``_init_weights``, ``reset_parameters`` where a module has it: an ``NF4Linear`` draws a float
    weight and quantizes it) and PEFT's LoRA init for adapters. Modules already holding data are only moved."""
    from torch.distributed.fsdp import FSDPModule

    from lightning_nf4.loading.deferred import allocate, deferred_checkpoint

    from lightning_nf4.strategies.vocab_parallel import is_vocab_parallel

    own = [m for m in own_modules(module, FSDPModule) if not is_vocab_parallel(m)]  # those are sharded already
    meta = any(t.is_meta for m in own for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
    allocate(own, device)
    if not meta:
        return
    from peft.tuners.lora import LoraLayer

    from lightning_nf4.layers.dora import reset_magnitudes
    from lightning_nf4.layers.lora import seeded_init

    source = deferred_checkpoint(hf)
    names = {id(m): n for n, m in hf.named_modules()} if source is not None and hf is not None else {}
    # the adapters' own modules (initialized with their layer), not the wrapped base (read or initialized as itself)
    lora_parts = {id(m) for sub in own if isinstance(sub, LoraLayer) for m in sub.modules()
                  if m is not sub and not any(m is b for b in sub.get_base_layer().modules())}
    with torch.no_grad():
        for sub in own:
            if isinstance(sub, LoraLayer) and hasattr(sub, "lora_init_seed"):
                seeded_init(sub)  # LoRACallback's init_seed: the values one process would have drawn
            elif isinstance(sub, LoraLayer):
                for adapter in sub.lora_A:
                    init_adapter(sub, adapter, (inits or {}).get(adapter, True))
            elif id(sub) in lora_parts:
                continue
            elif id(sub) in names:
                source.load_module(hf, sub, names[id(sub)])  # type: ignore[union-attr]
            elif isinstance(sub, NF4Linear) or hf is None:
                if callable(getattr(sub, "reset_parameters", None)):
                    sub.reset_parameters()
            else:  # a transformers model's own init: also norms and rotary tables, which have no reset_parameters
                hf._init_weights(sub)
        for sub in own:  # DoRA's magnitudes are norms of the weight: once the bases hold theirs
            if isinstance(sub, LoraLayer) and getattr(sub, "lora_magnitude_vector", None):
                reset_magnitudes(sub)


def read_deferred(module: nn.Module, device: torch.device) -> bool:
    """Read a model loaded with ``from_pretrained(..., device="meta")`` inside ``module`` whole onto ``device``, as
    ``shard`` reads it unit by unit (its checkpoint, the adapters' inits): for strategies that do not shard it.
    Returns whether there was one to read."""
    from lightning_nf4.export import find_hf_model
    from lightning_nf4.loading.deferred import deferred_checkpoint, forget_checkpoint

    hf = find_hf_model(module)[1]
    if deferred_checkpoint(hf) is None:
        return False
    _materialize(module, device, hf, peft_inits(module))
    forget_checkpoint(hf)
    return True


def peft_inits(module: nn.Module) -> dict[str, Any]:
    """Each PEFT adapter's ``init_lora_weights``, from the ``peft_config`` of the PEFT model(s) inside ``module``."""
    return {adapter: getattr(config, "init_lora_weights", True)
            for sub in module.modules() if isinstance(getattr(sub, "peft_config", None), dict)
            for adapter, config in sub.peft_config.items()}


def init_adapter(layer: Any, adapter: str, init: Any) -> None:
    """Draw ``adapter`` of a LoRA layer built on ``meta`` as PEFT draws it on a device for ``init_lora_weights=init``:
    ``True`` (Kaiming A, zero B), ``"gaussian"``, or ``False`` (nn.Linear's own init of both). Inits computed from the
    base weight (PiSSA, OLoRA, LoftQ, CorDA, EVA...) need it whole, which a model loaded on meta never is here."""
    if init is False:
        layer.lora_A[adapter].reset_parameters()
        layer.lora_B[adapter].reset_parameters()
    elif init is True or (isinstance(init, str) and init.lower() == "gaussian"):
        layer.reset_lora_parameters(adapter, init)
    else:
        raise NF4ShardingConfigError(
            f"init_lora_weights={init!r} (adapter {adapter!r}) computes the adapters from the base weights, which a model "
            "loaded with device='meta' holds only shard by shard under NF4FSDPStrategy. Load the model on a device before "
            "wrapping it with PEFT, or use True, 'gaussian' or False."
        )


def move_unsharded_state(module: nn.Module, device: torch.device) -> None:
    """Move every buffer and every module without parameters (a metric's states) under ``module`` to ``device``,
    leaving the parameters alone, and record ``device`` as a LightningModule's ``.device`` (what ``.to`` would
    record: ``self.device`` places a module's own tensors). Tensors still on ``meta`` are left for whoever
    materializes them."""
    from lightning.fabric.utilities.device_dtype_mixin import _update_properties

    _update_properties(module, device=device)
    _move_leftovers(module, device)


def _move_leftovers(module: nn.Module, device: torch.device) -> None:
    if next(module.parameters(), None) is None:
        if not any(t.is_meta for t in module.buffers()):
            module.to(device)  # not _apply: a torchmetrics Metric's states and its device follow .to
        return
    for name, buffer in module.named_buffers(recurse=False):
        if not buffer.is_meta:
            setattr(module, name, buffer.to(device))
    for child in module.children():
        _move_leftovers(child, device)


def own_modules(module: nn.Module, fsdp_type: type) -> Iterable[nn.Module]:
    """``module`` and its descendants, stopping at submodules already sharded (``fsdp_type``): what one FSDP unit holds."""
    yield module
    for child in module.children():
        if isinstance(child, fsdp_type):
            continue
        yield from own_modules(child, fsdp_type)


def _prepare_nf4(module: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for sub in own_modules(module, FSDPModule):
        if isinstance(sub, NF4Linear):
            sub.to_nf4_tensor()


def patch_fsdp_precision_check() -> None:
    """``Trainer(strategy="fsdp", plugins=NF4Precision())`` fails at construction, naming ``"nf4_fsdp"``,
    instead of with Lightning's TypeError about FSDPPrecision (Lightning #20855)."""
    from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
    from lightning.pytorch.trainer.connectors import accelerator_connector as module

    connector = module._AcceleratorConnector
    if getattr(connector, "_lightning_nf4_fsdp_checked", False) or not hasattr(connector, "_check_strategy_and_fallback"):
        return
    original = connector._check_strategy_and_fallback

    def _check_strategy_and_fallback(self: Any) -> None:
        from lightning_nf4.plugins.precision import NF4Precision, NF4PrecisionError

        flag = self._strategy_flag
        entry = dict.get(StrategyRegistry, flag) if isinstance(flag, str) else None
        is_fsdp1 = isinstance(flag, FSDPStrategy) or (entry is not None and entry["strategy"] is FSDPStrategy)
        if is_fsdp1 and isinstance(self._precision_plugin_flag, NF4Precision):
            raise NF4PrecisionError(
                f"strategy={flag if isinstance(flag, str) else type(flag).__name__!r} (FSDP1) cannot shard NF4 weights: it flattens "
                "parameters into one float buffer. Use strategy='nf4_fsdp' (lightning_nf4.strategies.NF4FSDPStrategy, FSDP2), "
                "or strategy='ddp' for models that fit on one device."
            )
        original(self)

    connector._check_strategy_and_fallback = _check_strategy_and_fallback
    connector._lightning_nf4_fsdp_checked = True
