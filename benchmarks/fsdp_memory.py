"""Where a sharded QLoRA step's device memory goes: live bytes by category and phase, NF4FSDPStrategy against DDP.

    python benchmarks/fsdp_memory.py                          # both configurations and the tables (about 5 min on 2 CPU cores)
    python benchmarks/fsdp_memory.py --one nf4_fsdp:2 --out DIR   # one configuration (what the driver runs)
    python benchmarks/fsdp_memory.py --report DIR             # the tables again from a finished run's JSON
    python benchmarks/fsdp_memory.py --specs nf4_fsdp+vocab_units:2      # a what-if (VARIANTS: proposed or earlier variants)

The same training step as ``benchmarks/fsdp_scaling.py`` (Lightning, random Llama weights at Llama-3-8B's layer
shape, batch 1 x ``--seq`` per rank, HF gradient checkpointing, LoRA r=16 on all 7 projections, AdamW, the chunked
loss ``lightning_nf4.losses.causal_lm_loss``, the grouped dequantize the GPU uses), but ``--layers`` decoder layers
and no GPU needed: two gloo ranks on the CPU. A ``TorchDispatchMode`` (``Ledger``) sees every op's outputs and
FSDP's storage resizes, so it knows each live storage's bytes, what made it (FSDP's all-gather or copy-out, the
dequantize op, a module's forward, its checkpoint recompute, the backward, the loss, the optimizer) and whose it is
at the peak (sharded or gathered parameter, gradient, optimizer state). The peak is kept per phase ("region") of
each step, with what is live at it.

Each category is then scaled to 32 layers and 2048 tokens: per-layer items (NF4 weights at rest, LoRA parameters,
gradients and Adam state, the activations checkpointing keeps, DDP's buckets) by the number of layers, items whose
shape holds the sequence length by 2048 / ``--seq``, the rest (one or two gathered units, the dequantized layer, the
loss's vocabulary chunk, the embeddings and head) as measured. The largest region after scaling is the predicted
per-GPU peak. Memory is counted as tensors' storage bytes (what ``torch.cuda.max_memory_allocated`` counts, less
the caching allocator's 512-byte rounding and kernels' own workspaces).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

GIB = 2**30
TARGET_LAYERS, TARGET_SEQ = 32, 2048
# fsdp_scaling.py's step and shapes: "8b" (Llama-3-8B's layers and vocabulary, untied head), "tiny" (a quick check)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_scaling import llama_step_module, shape_config  # noqa: E402
SHAPES = ("8b", "tiny")
GPU_MEASURED = {"nf4_fsdp:2": 6.95, "ddp:2": 7.39}  # results_h200x2_fsdp_scaling.md, commit 0d66f97, per GPU

# -- categories ----------------------------------------------------------------------------------------------
NF4_REST = "NF4 weights at rest"
VOCAB_REST = "embed_tokens + lm_head at rest"
NORM_REST = "norms at rest"
LORA_REST = "LoRA params at rest"
LORA_GRAD = "LoRA grads (kept for the optimizer)"
LORA_GRAD_UNSHARDED = "LoRA grads, unsharded (before reduce-scatter)"
OPT_STATE = "AdamW state"
DDP_BUCKETS = "DDP gradient buckets"
GATHERED = "gathered params: {}"
AG_BUFFER = "all-gather buffers"
RS_BUFFER = "reduce-scatter buffers"
DEQUANT = "dequantized bf16 weights"
ACT_FWD = "activations kept from forward"
ACT_RECOMPUTE = "recomputed activations (checkpoint)"
BWD_TEMP = "backward temporaries"
LOSS_TEMP = "loss temporaries"
OPT_TEMP = "optimizer temporaries"
BUFFERS = "buffers (rotary tables)"
FSDP_OTHER = "FSDP other"
OTHER = "other"

# per-layer items: scaled by layers (those of the layer being processed count once, the others for 31 of 32)
PER_LAYER = {NF4_REST, NORM_REST, LORA_REST, LORA_GRAD, OPT_STATE, ACT_FWD}
ALL_LAYERS = {DDP_BUCKETS}  # one buffer for every layer's LoRA gradients: scaled by layers as a whole
SEQ_SCALED = {ACT_FWD, ACT_RECOMPUTE, BWD_TEMP, LOSS_TEMP, OTHER}  # when the tensor's shape holds the sequence length

# Python files (innermost frame first) that say what an allocation is for; frames of other files are skipped.
_MARKERS = (
    ("/torch/distributed/fsdp/_fully_shard/", "fsdp"),
    ("/torch/nn/parallel/distributed.py", "ddp"),
    ("/torch/optim/", "optim"),
    ("/lightning_nf4/losses.py", "loss"),
    ("/lightning_nf4/layers/group.py", "dequant"),
    ("/transformers/", "model"),
    ("/peft/", "model"),
    ("/torch/nn/", "model"),
    ("/lightning_nf4/layers/", "model"),
    ("/torch/utils/checkpoint.py", "model"),
    ("/torch/autograd/", "autograd"),
)
_FSDP_FUNCTIONS = {
    "foreach_all_gather": AG_BUFFER, "_get_param_all_gather_inputs": AG_BUFFER,
    "foreach_all_gather_copy_out": "gathered", "init_all_gather_outputs": "gathered", "alloc_all_gather_outputs": "gathered",
    "init_unsharded_param": "gathered", "foreach_reduce": RS_BUFFER, "foreach_reduce_scatter_copy_in": RS_BUFFER,
}


class _Entry:
    __slots__ = ("nbytes", "tag", "owner", "shape", "dtype", "born")

    def __init__(self, nbytes: int, tag: str, owner: Optional[int], shape: tuple, dtype: str, born: str) -> None:
        self.nbytes, self.tag, self.owner, self.shape, self.dtype, self.born = nbytes, tag, owner, shape, dtype, born


class _Region:
    """The peak of one phase of one step, and what was live then (kept to within ``SNAP_STEP`` bytes of it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.peak = 0
        self.snap_total = -1
        self.items: list[tuple] = []
        self.at: dict[str, Any] = {}


class Ledger(TorchDispatchMode):
    """Live tensor storages by what made them, and the peak of each phase with what was live at it.

    Sees the outputs of every op run while active (inner storages of wrapper subclasses such as ``NF4Tensor``
    included; ``DTensor`` ops are let through to their local ops, as torch's ``MemTracker`` does) and
    ``UntypedStorage.resize_``, with which FSDP2 frees and reallocates gathered parameters.
    """

    SNAP_STEP = 2**20

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self.entries: dict[int, _Entry] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._lock = threading.RLock()
        self.total = 0
        self.regions: dict[str, _Region] = {}
        self.step = 0
        self.training = False
        # set at train start: module ids of the HF model, which decoder layer each belongs to, unit names
        self.layer_of: dict[int, int] = {}
        self.hf_ids: set[int] = set()
        self.embed_ids: set[int] = set()
        self.root_id: Optional[int] = None
        self.layers = 0
        self.unit_ids: set[int] = set()
        self.roles_fn = None
        self._stack: list[int] = []
        self.fwd_layer: Optional[int] = None
        self.bw_layer: Optional[int] = None
        self.model_done = False
        self.layers_seen = False
        self.backward_seen = False
        self._orig_resize = None
        self._hooks: list[Any] = []

    # -- storages -------------------------------------------------------------------------------------------
    def _add(self, st: torch.UntypedStorage, tag: str, owner: Optional[int], shape: tuple, dtype: str) -> None:
        key = st._cdata
        with self._lock:
            if key in self.entries:
                return
            n = st.nbytes()
            if st.device.type == "cuda":
                n = -(-n // 512) * 512
            self.entries[key] = _Entry(n, tag, owner, shape, dtype, self.region())
            self._refs[key] = weakref.ref(st, functools.partial(self._gone, key))
            self.total += n

    def _gone(self, key: int, _ref: Any) -> None:
        with self._lock:
            entry = self.entries.pop(key, None)
            self._refs.pop(key, None)
            if entry is not None:
                self.total -= entry.nbytes

    def _resized(self, st: torch.UntypedStorage) -> None:
        with self._lock:
            entry = self.entries.get(st._cdata)
            if entry is None:
                self._add(st, *self._tag(None), (), "")
            else:
                n = st.nbytes()
                if st.device.type == "cuda":
                    n = -(-n // 512) * 512
                self.total += n - entry.nbytes
                entry.nbytes = n
        self._check("resize_")

    def _track(self, t: torch.Tensor, func: Any) -> None:
        if is_traceable_wrapper_subclass(t):  # e.g. an NF4Tensor: its codes and scales
            for attr in t.__tensor_flatten__()[0]:
                inner = getattr(t, attr)
                if isinstance(inner, torch.Tensor):
                    self._track(inner, func)
            return
        st = t.untyped_storage()
        if st._cdata not in self.entries and st.device.type != "meta":
            self._add(st, *self._tag(func), tuple(t.shape), str(t.dtype).replace("torch.", ""))

    # -- what made it -----------------------------------------------------------------------------------------
    def _tag(self, func: Any) -> tuple[str, Optional[int]]:
        backward = torch._C._current_graph_task_id() != -1
        owner = self.fwd_layer if self._stack else (self.bw_layer if backward else None)
        if func is not None and "dequantize_4bit" in str(func):
            return DEQUANT, owner
        kind, fsdp = None, None
        frame = sys._getframe(1)
        depth = 0
        while frame is not None and depth < 80:
            path = frame.f_code.co_filename
            if "/lightning_nf4/format/quantized.py" in path and "dequantize" in frame.f_code.co_name:
                kind = "dequant"  # one weight dequantized on its own (no group)
            for marker, name in _MARKERS:
                if kind is None and marker in path:
                    kind = name
                    break
            if kind == "fsdp":  # the FSDP function furthest out that names the purpose wins (copy-out calls allocate)
                g = frame
                while g is not None and "/fsdp/_fully_shard/" in g.f_code.co_filename:
                    fsdp = _FSDP_FUNCTIONS.get(g.f_code.co_name, fsdp)
                    g = g.f_back
                break
            if kind is not None:
                break
            frame = frame.f_back
            depth += 1
        if kind == "fsdp":
            return (fsdp or FSDP_OTHER), owner
        if kind == "ddp":
            return DDP_BUCKETS, None
        if kind == "optim":
            return OPT_TEMP, None
        if kind == "dequant":
            return DEQUANT, owner
        if kind == "loss":
            return (BWD_TEMP if backward else LOSS_TEMP), None
        if kind in ("model", "autograd"):
            if backward:
                return (ACT_RECOMPUTE if self._stack else BWD_TEMP), owner
            return ACT_FWD, owner
        return OTHER, owner

    # -- where we are -------------------------------------------------------------------------------------------
    def region(self) -> str:
        if not self.training:
            return "build (setup, before training)"
        step = f"step {self.step}: "
        if torch._C._current_graph_task_id() != -1:
            self.backward_seen = True
            layer = self.fwd_layer if self._stack else self.bw_layer
            if layer is None:
                return step + "bwd, loss/norm/head (before the top layer)"
            return step + "bwd, " + self._layer_label(layer, backward=True)
        if self._stack:
            if self.fwd_layer is not None:
                return step + "fwd, " + self._layer_label(self.fwd_layer, backward=False)
            if any(i in self.embed_ids for i in self._stack):
                return step + "fwd, embeddings"
            return step + ("fwd, root after the layers (norm)" if self.layers_seen else "fwd, root before the layers (its gather)")
        if self.backward_seen:
            return step + "after backward (optimizer step)"
        if self.model_done:
            return step + "loss (head gathered, chunked CE)"
        return step + "before forward"

    def _layer_label(self, layer: int, backward: bool) -> str:
        if layer == self.layers - 1:
            return "top layer" + (" (first in backward)" if backward else " (last in forward)")
        if layer == 0:
            return "layer 0" + (" (last in backward) and the end" if backward else " (first in forward)")
        return "middle layers"

    def _check(self, op: Any) -> None:
        total = self.total
        name = self.region()
        region = self.regions.get(name)
        if region is None:
            region = self.regions[name] = _Region(name)
        if total > region.peak:
            region.peak = total
            if total >= region.snap_total + self.SNAP_STEP:
                self._snapshot(region, op)

    def _snapshot(self, region: _Region, op: Any) -> None:
        roles = self.roles_fn() if self.roles_fn is not None else {}
        items = []
        with self._lock:
            region.snap_total = self.total
            for key, e in self.entries.items():
                if e.nbytes:
                    cat, owner = roles.get(key, (e.tag, e.owner))
                    items.append((cat, owner, e.nbytes, e.shape, e.dtype, e.born))
        region.items = items
        layer = (self.fwd_layer if self._stack else self.bw_layer) if torch._C._current_graph_task_id() != -1 else (self.fwd_layer if self._stack else None)
        region.at = {"op": str(op), "active_layer": layer, "total": region.snap_total}

    # -- dispatch ------------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, func)
        self._check(func)
        return out

    # -- module and phase hooks ------------------------------------------------------------------------------------
    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        i = id(module)
        if i in self.hf_ids:
            self._stack.append(i)
            if i in self.layer_of:
                self.fwd_layer = self.layer_of[i]
                self.layers_seen = True

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        i = id(module)
        if i not in self.hf_ids or not self._stack:
            return
        if self._stack[-1] == i:
            self._stack.pop()
        elif i in self._stack:
            del self._stack[self._stack.index(i):]
        self.fwd_layer = next((self.layer_of[j] for j in reversed(self._stack) if j in self.layer_of), None)
        backward = torch._C._current_graph_task_id() != -1
        if i == self.root_id and not backward:
            self.model_done = True
        if i in self.layer_of and self.layer_of[i] is not None and not backward and torch.is_grad_enabled():
            parent = self.layer_of[i]
            first = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(first, torch.Tensor) and first.requires_grad and self._is_unit(i):
                first.register_hook(functools.partial(self._enter_backward, parent))

    def _is_unit(self, module_id: int) -> bool:
        return module_id in self.unit_ids

    def _enter_backward(self, layer: int, grad: torch.Tensor) -> None:
        self.bw_layer = layer

    def new_step(self, step: int) -> None:
        self.step, self.training = step, True
        self.bw_layer = self.fwd_layer = None
        self.model_done = self.layers_seen = self.backward_seen = False
        self._stack.clear()

    def bind(self, hf: torch.nn.Module, units: list[torch.nn.Module], roles_fn: Any) -> None:
        """Name the model's parts once it is built and wrapped (at train start)."""
        self.hf_ids = {id(m) for m in hf.modules()}
        self.unit_ids = {id(u) for u in units}
        self.layers = len(units)
        for index, unit in enumerate(units):
            for m in unit.modules():
                self.layer_of[id(m)] = index
        embed = hf.get_input_embeddings()
        self.embed_ids = {id(m) for m in embed.modules()}
        self.root_id = id(hf)
        self.roles_fn = roles_fn

    def __enter__(self) -> "Ledger":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._orig_resize = orig = torch.UntypedStorage.resize_
        ledger = self

        @functools.wraps(orig)
        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = orig(st, size)
            ledger._resized(st)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        self._hooks = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
        for handle in self._hooks:
            handle.remove()
        super().__exit__(*exc)

    def summary(self) -> dict[str, Any]:
        regions = []
        for r in self.regions.values():
            agg: dict[tuple, list] = defaultdict(lambda: [0, 0, None])
            for cat, owner, n, shape, dtype, _born in r.items:
                seqdep = self.seq in shape
                key = (cat, owner, seqdep)
                agg[key][0] += n
                agg[key][1] += 1
                if agg[key][2] is None or n > agg[key][2][0]:
                    agg[key][2] = (n, list(shape), dtype)
            largest = sorted(r.items, key=lambda x: -x[2])[:12]
            regions.append({
                "name": r.name, "peak": r.peak, "at": r.at,
                "items": [{"cat": k[0], "owner": k[1], "seq": k[2], "bytes": v[0], "count": v[1], "largest": v[2]} for k, v in agg.items()],
                "largest": [{"cat": c, "owner": o, "bytes": n, "shape": list(s), "dtype": d, "born": b} for c, o, n, s, d, b in largest],
            })
        return {"regions": regions}


# -- whose is it: parameters, gradients, optimizer state at snapshot time ------------------------------------------------
def _param_kind(name: str, is_nf4: bool) -> str:
    if "lora_" in name:
        return LORA_REST
    if is_nf4:
        return NF4_REST
    if "embed_tokens" in name or "lm_head" in name:
        return VOCAB_REST
    return NORM_REST


def _layer_index(name: str) -> Optional[int]:
    m = re.search(r"\.layers\.(\d+)(\.|$)", "." + name)
    return int(m.group(1)) if m else None


def make_roles(pl_module: torch.nn.Module, trainer: Any) -> Any:
    """A function giving, for the storages of parameters, their gradients and the optimizer state, what they are now."""
    from torch.distributed._tools.common_utils import get_untyped_storages
    from torch.distributed.fsdp import FSDPModule

    from lightning_nf4.format.tensor import NF4Tensor
    from lightning_nf4.layers.linear import NF4Linear

    names = {id(p): n for n, p in pl_module.named_parameters()}
    module_names = {id(m): n for n, m in pl_module.named_modules()}
    fsdp_modules = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, FSDPModule)]
    nf4_modules = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, NF4Linear)]

    def unit_label(name: str) -> str:
        if _layer_index(name) is not None:
            return "decoder layers"
        return "embeddings" if "embed_tokens" in name else "head and final norm"

    def roles() -> dict[int, tuple[str, Optional[int]]]:
        out: dict[int, tuple[str, Optional[int]]] = {}

        def put(t: Optional[torch.Tensor], cat: str, owner: Optional[int]) -> None:
            if t is None:
                return
            for st in get_untyped_storages(t):
                out.setdefault(st._cdata, (cat, owner))

        for opt in trainer.optimizers:
            for state in opt.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        put(v, OPT_STATE, None)  # owner filled below from the parameter
            for p, state in opt.state.items():
                owner = _layer_index(names.get(id(p), ""))
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        for st in get_untyped_storages(v):
                            out[st._cdata] = (OPT_STATE, owner)
        if fsdp_modules:
            for mod_name, m in fsdp_modules:
                group = m._get_fsdp_state()._fsdp_param_group
                if group is None:
                    continue
                for fp in group.fsdp_params:
                    info = fp._module_info
                    pname = f"{module_names.get(id(info.module), mod_name)}.{info.param_name}"
                    owner = _layer_index(pname)
                    local = fp._sharded_local_tensor
                    is_nf4 = isinstance(local, NF4Tensor)
                    kind = _param_kind(pname, is_nf4) if not fp.sharded_param.requires_grad else LORA_REST
                    put(fp.sharded_param, kind, owner)
                    put(fp.sharded_param.grad, LORA_GRAD, owner)
                    gathered = GATHERED.format(unit_label(mod_name))
                    for t in list(getattr(fp, "all_gather_outputs", [])) + list(getattr(fp, "_unsharded_inner_tensors", [])):
                        put(t, gathered, owner)
                    unsharded = getattr(fp, "_unsharded_param", None)
                    if unsharded is not None:
                        put(unsharded.grad, LORA_GRAD_UNSHARDED, owner)
            for name, p in pl_module.named_parameters():  # the tables split by vocabulary: outside FSDP's units
                if "embed_tokens" in name or "lm_head" in name:
                    put(p, VOCAB_REST, None)
        else:
            for name, m in nf4_modules:
                owner = _layer_index(name)
                for t in m.quant.tensors():
                    put(t, NF4_REST, owner)
            for name, p in pl_module.named_parameters():
                owner = _layer_index(name)
                put(p.grad, LORA_GRAD, owner)
                if isinstance(p, NF4Tensor) or (p.dtype == torch.uint8):
                    put(p, NF4_REST, owner)
                else:
                    put(p, _param_kind(name, False) if not p.requires_grad else LORA_REST, owner)
        for name, b in pl_module.named_buffers():
            put(b, BUFFERS, None)
        return out

    return roles


# -- what-ifs: proposed changes to NF4FSDPStrategy and the loss, applied in this process only ----------------------------
# Each is a sketch of a library change, measured here before anyone makes it; lightning_nf4 itself is not edited.
VARIANTS = {
    "embed_frozen": "the frozen embeddings unit is never gathered in backward (set_unshard_in_backward(False))",
    "head_unit": "lm_head is a unit of its own (the root holds no parameters)",
    "vocab_parallel": "embeddings and head never gathered (now NF4FSDPStrategy's default, vocab_parallel='auto'; no change)",
    "vocab_units": "embeddings and head as FSDP units, gathered for use (NF4FSDPStrategy(vocab_parallel=False), the path before)",
    "ungrouped": "each projection dequantized on its own (NF4Precision(group_dequantize=False))",
    "redequantize": "the checkpoint recompute keeps no dequantized weight: backward dequantizes again (as without checkpointing)",
}


def patch_strategy(variants: set[str]) -> None:
    """Before the strategy shards: the head as its own unit (after the embeddings); NF4Linear's recompute path."""
    if "redequantize" in variants:  # the library's option, NF4Precision(low_memory_recompute=True), for every NF4 layer
        from lightning_nf4.layers.linear import NF4Linear

        NF4Linear.low_memory_recompute = True
    if "head_unit" not in variants:  # with vocab_units: the library splits the untied frozen head by vocabulary otherwise
        return
    from lightning_nf4.strategies import fsdp

    original = fsdp._vocabulary_modules

    def with_head(hf: Any) -> list:
        tables = original(hf)
        head = hf.get_output_embeddings() if hf is not None else None
        return tables + [head] if head is not None and all(head is not t for t in tables) else tables

    fsdp._vocabulary_modules = with_head


def patch_model(hf: torch.nn.Module, variants: set[str]) -> None:
    """Once sharded (at train start): FSDP settings of the vocabulary units."""
    from torch.distributed.fsdp import FSDPModule

    embed = hf.get_input_embeddings()
    if "embed_frozen" in variants and isinstance(embed, FSDPModule):
        embed.set_unshard_in_backward(False)


# -- one configuration: a Lightning fit under the ledger ---------------------------------------------------------------
def run_one(spec: str, layers: int, seq: int, steps: int, out: Path, shape: str = "8b") -> None:
    import lightning.pytorch as pl

    from lightning_nf4 import LoRACallback, NF4Precision
    from lightning_nf4.strategies import NF4FSDPStrategy

    strategy_name, devices = spec.split(":")
    strategy_name, *flags = strategy_name.split("+")  # e.g. nf4_fsdp+embed_frozen+head_unit:2
    variants = set(flags)
    if variants - set(VARIANTS):
        raise SystemExit(f"unknown variant(s) {sorted(variants - set(VARIANTS))} in {spec}; known: {sorted(VARIANTS)}")
    devices = int(devices)
    pl.seed_everything(0, verbose=False)  # the same weights and batches in every configuration: the losses compare
    patch_strategy(variants)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    config = shape_config(shape, seq)  # fsdp_scaling.py's shapes, with this run's number of layers
    config.num_hidden_layers = layers
    ledger = Ledger(seq)

    class Track(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            ledger.__enter__()

        def on_train_start(self, trainer, pl_module):
            hf = pl_module.model
            layers = next(m for m in hf.modules() if isinstance(m, torch.nn.ModuleList))  # the decoder layers
            ledger.bind(hf, list(layers), make_roles(pl_module, trainer))
            patch_model(hf, variants)
            self.cuda_peaks: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            ledger.new_step(batch_idx + 1)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            if on_gpu:
                self.cuda_peaks.append(torch.cuda.max_memory_allocated() / GIB)

        def on_train_end(self, trainer, pl_module):
            ledger.__exit__(None, None, None)
            result = {"spec": spec, "shape": shape, "layers": layers, "seq": seq, "steps": steps, "rank": trainer.global_rank,
                      "device": torch.cuda.get_device_name() if on_gpu else "cpu", "cuda_peaks_gib": self.cuda_peaks,
                      "losses": self.losses, **ledger.summary()}
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{spec.replace(':', '_')}_rank{trainer.global_rank}.json").write_text(json.dumps(result))

    data = torch.randint(0, config.vocab_size, (steps * devices, seq))
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    as_units = bool(variants & {"vocab_units", "head_unit"})
    strategy = NF4FSDPStrategy(vocab_parallel=False if as_units else "auto") if strategy_name == "nf4_fsdp" else (strategy_name if devices > 1 else "auto")
    if variants and strategy_name != "nf4_fsdp":
        raise SystemExit(f"{spec}: the variants change NF4FSDPStrategy; use them with nf4_fsdp")
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        plugins=NF4Precision(group_dequantize="ungrouped" not in variants),  # True is the GPU default ("auto")
        callbacks=[LoRACallback(r=16, alpha=32, dropout=0.0, target_modules="all-linear"), Track()],
    )
    module = llama_step_module(config, strategy_name.startswith("nf4_fsdp"))
    trainer.fit(module, train_dataloaders=loader)


# -- scaling to the full model and the tables ------------------------------------------------------------------------------
def scaled(region: dict, layers: int, seq: int, to_layers: int = TARGET_LAYERS, to_seq: int = TARGET_SEQ) -> dict[str, float]:
    """Bytes per category of one region's peak, scaled to ``to_layers`` layers and ``to_seq`` tokens."""
    active = region["at"].get("active_layer")
    out: dict[str, float] = defaultdict(float)
    for item in region["items"]:
        cat, owner, n = item["cat"], item["owner"], float(item["bytes"])
        if cat in PER_LAYER and owner is not None:
            if owner != active:  # the other layers: all of them at the stack's ends, where the peaks are
                k = 1 if active is not None else 0
                n *= (to_layers - k) / (layers - k)
        elif cat in ALL_LAYERS:
            n *= to_layers / layers
        if item["seq"] and cat in SEQ_SCALED:
            n *= to_seq / seq
        out[cat] += n
    return dict(out)


def _cat_order(cat: str) -> int:
    order = [NF4_REST, VOCAB_REST, NORM_REST, LORA_REST, LORA_GRAD, OPT_STATE, DDP_BUCKETS, LORA_GRAD_UNSHARDED,
             GATHERED.format("decoder layers"), GATHERED.format("embeddings"), GATHERED.format("head and final norm"), AG_BUFFER,
             RS_BUFFER, DEQUANT, ACT_FWD, ACT_RECOMPUTE, BWD_TEMP, LOSS_TEMP, OPT_TEMP, BUFFERS, FSDP_OTHER, OTHER]
    return order.index(cat) if cat in order else len(order)


def report(folder: Path) -> str:
    lines: list[str] = []
    runs: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*_rank*.json")):
        data = json.loads(path.read_text())
        runs[data["spec"]].append(data)
    final: dict[str, tuple[str, dict, float]] = {}
    measured_gpu: dict[str, Optional[float]] = {}
    for spec, ranks in runs.items():
        rank0 = next(r for r in ranks if r["rank"] == 0)
        layers, seq = rank0["layers"], rank0["seq"]
        gpu = GPU_MEASURED.get(spec) if rank0.get("shape", "8b") == "8b" else None
        lines.append(f"\n### {spec}: {layers} layers x {seq} tokens measured, scaled to {TARGET_LAYERS} x {TARGET_SEQ} (rank 0; ranks' measured peaks: "
                     + ", ".join(f"{max(x['peak'] for x in r['regions'] if x['name'].startswith('step')) / GIB:.3f}" for r in sorted(ranks, key=lambda r: r["rank"])) + " GiB)\n")
        lines.append("| region (phase of the step) | measured GiB | scaled GiB | active layer at the peak | op at the peak |")
        lines.append("|---|---|---|---|---|")
        best = None
        for region in rank0["regions"]:
            if not region["name"].startswith("step") or not region["items"]:
                continue
            total = sum(scaled(region, layers, seq).values())
            lines.append(f"| {region['name']} | {region['peak'] / GIB:.3f} | {total / GIB:.2f} | {region['at'].get('active_layer')} | `{region['at'].get('op', '')[:60]}` |")
            if best is None or total > best[2]:
                best = (region["name"], region, total)
        build = next((r for r in rank0["regions"] if r["name"].startswith("build")), None)
        if build:
            lines.append(f"| (build, before training) | {build['peak'] / GIB:.3f} | - | | |")
        assert best is not None
        final[spec] = best
        measured_gpu[spec] = gpu
        name, region, total = best
        cats = scaled(region, layers, seq)
        measured: dict[str, float] = defaultdict(float)
        for item in region["items"]:
            measured[item["cat"]] += item["bytes"]
        lines.append(f"\nLargest after scaling: **{name}**, {total / GIB:.2f} GiB predicted at {TARGET_LAYERS} layers x {TARGET_SEQ} tokens"
                     + (f" (measured on two H200 at commit 0d66f97: {gpu:.2f} GiB)" if gpu else "") + ". Live then:\n")
        lines.append("| category | measured MiB | scaled GiB | largest tensor (shape, dtype) |")
        lines.append("|---|---|---|---|")
        largest: dict[str, Any] = {}
        for item in region["items"]:
            if item["largest"] and (item["cat"] not in largest or item["largest"][0] > largest[item["cat"]][0]):
                largest[item["cat"]] = item["largest"]
        for cat in sorted(cats, key=_cat_order):
            big = largest.get(cat)
            big_s = f"{big[1]} {big[2]}" if big else ""
            lines.append(f"| {cat} | {measured[cat] / 2**20:.1f} | {cats[cat] / GIB:.3f} | {big_s} |")
    lines.append(f"\n### Summary: predicted per-GPU peak at {TARGET_LAYERS} layers x {TARGET_SEQ} tokens\n")
    lines.append("| configuration | predicted peak GiB | / ddp:2 | where | measured on two H200 at 0d66f97 | step losses (rank 0) |")
    lines.append("|---|---|---|---|---|---|")
    ddp = final.get("ddp:2")
    for spec, (name, _region, total) in final.items():
        ratio = f"{total / ddp[2]:.2f}x" if ddp else "-"
        losses = ", ".join(f"{x:.5f}" for x in next(r for r in runs[spec] if r["rank"] == 0).get("losses", []))
        lines.append(f"| {spec} | {total / GIB:.2f} | {ratio} | {name} | {measured_gpu.get(spec) or '-'} | {losses} |")
    return "\n".join(lines)


def drive(specs: list[str], layers: int, seq: int, steps: int, out: Path, timeout: int, shape: str = "8b") -> None:
    for spec in specs:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", spec, "--layers", str(layers), "--seq", str(seq), "--steps", str(steps), "--out", str(out), "--shape", shape]
        # its own session, so that Lightning's second rank goes with it if the time runs out
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            print(f"{spec}: timed out after {timeout} s", flush=True)
            continue
        if proc.returncode != 0:
            print(f"{spec} failed ({proc.returncode}):\n{log[-4000:]}", flush=True)
            continue
        print(f"{spec}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(report(out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help="run one configuration, e.g. nf4_fsdp:2 or ddp:2")
    parser.add_argument("--specs", default="nf4_fsdp:2,ddp:2")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="layer shape: 8b (Llama-3-8B) or tiny (a quick check)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    parser.add_argument("--report", metavar="DIR", help="print the tables from a finished run's JSON files")
    parser.add_argument("--out", default=os.environ.get("OUT", "outputs/fsdp_memory"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.report:
        print(report(Path(args.report)))
    elif args.one:
        run_one(args.one, args.layers, args.seq, args.steps, Path(args.out), args.shape)
    else:
        drive(args.specs.split(","), args.layers, args.seq, args.steps, Path(args.out), args.timeout, args.shape)
