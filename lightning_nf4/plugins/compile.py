"""Compile each repeated block of a model (its decoder layers) in place, once its final structure is set.

``block.compile()`` compiles the block's call where it sits: the module, its parameters and their names
stay as they are (``torch.compile(model)`` would wrap the model and prefix every state-dict key with
``_orig_mod.``), so checkpoints, resume, DDP and the exports see the same model. Compiling per block
rather than the whole model gives one graph that every layer of the same class reuses, which keeps the
compile time to that of one layer, and lets Hugging Face's per-layer gradient checkpointing wrap it.
Compilation is lazy: it happens at the first call, after every structural change made before it
(NF4 conversion, LoRA injection). ``LoRACallback(compile=...)`` is the switch that calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_nf4.devices import major_minor
from lightning_nf4.layers.group import find_by_class, repeated_blocks

Blocks = Union[str, Sequence[Union[str, type]]]
_COMPILE_KEYS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor's modes that record CUDA graphs


class CompileConfigError(ValueError):
    """A compile setting that cannot be applied; the message names the fix."""


def compile_option(value: Union[None, bool, Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """Normalize the ``compile=`` switch: False/None -> None (off); True -> {} (defaults); a mapping of
    ``torch.compile`` keywords (``mode``, ``dynamic``, ``fullgraph``, ``backend``, ``options``) and
    ``blocks`` (class names or classes to compile, default ``"auto"``) -> a checked copy."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise CompileConfigError(f"compile must be True, False or a mapping of torch.compile options, got {value!r}.")
    unknown = sorted(set(value) - set(_COMPILE_KEYS) - {"blocks"})
    if unknown:
        raise CompileConfigError(f"compile got unknown option(s) {unknown}; allowed: {['blocks', *_COMPILE_KEYS]}.")
    if value.get("mode") in _CUDA_GRAPH_MODES or (value.get("options") or {}).get("triton.cudagraphs"):
        raise CompileConfigError(
            f"compile mode {value.get('mode', 'triton.cudagraphs')!r} records CUDA graphs, which per-layer compiled training "
            "cannot use: each layer's graph overwrites the outputs the previous layer's backward still needs (seen on an "
            "H200 with torch 2.11, benchmarks/NOTES.md). Use the default mode or 'max-autotune-no-cudagraphs'."
        )
    blocks = value.get("blocks", "auto")
    if not (blocks == "auto" or isinstance(blocks, (str, type)) or (isinstance(blocks, Sequence) and blocks and all(isinstance(b, (str, type)) for b in blocks))):
        raise CompileConfigError(f"compile['blocks'] must be 'auto', or block class names or classes, got {blocks!r}.")
    return dict(value)


def find_blocks(module: nn.Module, blocks: Blocks = "auto") -> list[nn.Module]:
    """The repeated blocks of ``module``, outermost first: ``"auto"`` takes a transformers model's
    ``_no_split_modules`` classes (its decoder layer), else the elements of its outermost ``nn.ModuleList``;
    otherwise the modules of the named classes."""
    if blocks == "auto":
        found = repeated_blocks(module)
        if not found:
            raise CompileConfigError(
                f"found no repeated block to compile in {type(module).__name__} (no transformers decoder layer, no "
                "nn.ModuleList). Name the block class: compile={'blocks': ['MyBlock']}."
            )
        return found
    wanted = [blocks] if isinstance(blocks, (str, type)) else list(blocks)
    found = find_by_class(module, wanted)  # a block inside another is compiled with it
    if not found:
        classes = sorted({type(m).__name__ for m in module.modules()})
        raise CompileConfigError(
            f"compile blocks {[w if isinstance(w, str) else w.__name__ for w in wanted]} matched no module of "
            f"{type(module).__name__}; module classes present: {classes[:20]}."
        )
    return found


def compile_blocks(module: nn.Module, blocks: Blocks = "auto", **compile_kwargs: Any) -> list[nn.Module]:
    """``block.compile(**compile_kwargs)`` for each repeated block of ``module`` not compiled yet; returns the
    blocks. Idempotent: a block already compiled keeps its compiled call."""
    found = find_blocks(module, blocks)
    for block in found:
        if getattr(block, "_compiled_call_impl", None) is None:
            if not COMPILER_TRACES_NF4_EXPERTS:
                experts_run_eagerly(block)
            block.compile(**compile_kwargs)
    return found


# torch 2.11's compiler fails inside transformers' experts forward on an NF4Tensor weight (it traces the subclass's
# construction and reads it half built: "InternalTorchDynamoError: AttributeError: quant"); 2.13's traces it.
COMPILER_TRACES_NF4_EXPERTS = major_minor(torch.__version__) >= (2, 13)


def experts_run_eagerly(block: nn.Module) -> list[type]:
    """The classes of ``block``'s modules that hold NF4 expert weights run outside compiled graphs (a graph break on
    each side; the rest of the block stays compiled). Set on the class, not the module, so that copies of the model
    call their own weights; eager calls are unchanged. Returns the classes."""
    from lightning_nf4.format.tensor import NF4Tensor

    classes = []
    for sub in block.modules():
        cls = type(sub)
        if any(isinstance(p, NF4Tensor) for p in sub.parameters(recurse=False)) and not getattr(cls.forward, "_nf4_eager", False):
            eager = torch.compiler.disable(cls.forward, recursive=True)
            eager._nf4_eager = True
            cls.forward = eager
            classes.append(cls)
    return classes


def compiled_blocks(module: nn.Module) -> list[nn.Module]:
    """The submodules of ``module`` that ``compile_blocks`` (or ``Module.compile``) compiled."""
    return [m for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None]
