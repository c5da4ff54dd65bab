"""Cross-entropy over a linear head without the whole ``[tokens x vocab]`` logits or their gradient.

At a 128k vocabulary the logits of 2048 tokens, their fp32 copy and their gradient are several GiB: the
largest single item of a QLoRA step's memory. ``linear_cross_entropy`` computes the same loss and gradients
token chunk by token chunk, so memory stays ``O(chunk x vocab)``; on CUDA it uses liger-kernel's fused
kernel when that package is installed (an optional dependency). ``causal_lm_loss`` applies it to a Hugging
Face causal LM without asking the model for its logits.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduction = Literal["mean", "sum"]
Backend = Literal["auto", "chunked", "liger"]
LossMode = Literal["chunked", "plain"]

# One chunk's fp32 logits are kept under this many bytes by default (128 MiB: 256 tokens at a 128k vocabulary).
DEFAULT_CHUNK_BYTES = 128 * 2**20


class LinearCrossEntropyError(ValueError):
    """Arguments ``linear_cross_entropy`` cannot compute with; the message names the fix."""


# -- the tensor-level helper --------------------------------------------------------------------------
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    shift: bool = False,
    chunk_size: Optional[int] = None,
    backend: Backend = "auto",
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), labels)`` without materializing the logits whole.

    Args:
        hidden: ``[..., H]`` final hidden states (any float dtype; under autocast the matmuls run in the
            autocast dtype, as ``F.linear`` would).
        weight: ``[V, H]`` head weight (e.g. ``lm_head.weight``, tied or not); gets a gradient if it requires one.
        labels: ``[...]`` integer targets in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` head bias.
        ignore_index: targets that add nothing to the loss and are not counted.
        reduction: ``"mean"`` over the counted targets (0, not NaN, when every target is ignored) or ``"sum"``.
        shift: labels are the input ids of a causal LM: position ``t`` predicts ``labels[..., t + 1]``, as
            Hugging Face's causal-LM loss shifts them (``hidden`` must then be ``[B, T, H]``, ``labels`` ``[B, T]``).
        chunk_size: tokens per chunk (default: as many as keep one chunk's fp32 logits under 128 MiB).
        backend: ``"auto"`` (liger-kernel on CUDA when installed, else ``"chunked"``), ``"chunked"`` (portable
            PyTorch, any device), or ``"liger"`` (liger-kernel's fused kernel; an error if not installed).

    Returns a float32 scalar. Logits are computed in the compute dtype (the autocast dtype, else the promoted
    dtype of ``hidden`` and ``weight``) and the softmax in float32, as the plain path does; losses and
    gradients agree with it to float32 rounding in float32 and to bfloat16 rounding in bfloat16 (the weight
    gradient is summed over chunks in ``weight``'s dtype).
    """
    _check(hidden, weight, labels, bias, reduction, chunk_size, backend)
    if shift:
        labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)  # HF's shift: the last position has no target
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    count = (flat_labels != ignore_index).sum()
    scale = 1.0 / count.clamp(min=1).to(torch.float32) if reduction == "mean" else torch.ones((), device=hidden.device)
    if _use_liger(backend, flat_hidden):
        total = _liger_sum(flat_hidden, weight, flat_labels, bias, ignore_index)
        return total * scale
    compute_dtype = _compute_dtype(flat_hidden, weight)
    rows = chunk_size or default_chunk_size(weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, bias, flat_labels, scale, ignore_index, rows, compute_dtype)


def default_chunk_size(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk whose fp32 logits fit ``budget_bytes`` (a multiple of 64 when that is at least 64)."""
    rows = max(1, budget_bytes // (4 * vocab_size))
    return rows - rows % 64 if rows >= 64 else rows


def _check(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], reduction: str,
           chunk_size: Optional[int], backend: str) -> None:
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise LinearCrossEntropyError(
            f"hidden [..., H] and weight [V, H] must agree on H: got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}."
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise LinearCrossEntropyError(
            f"labels must have hidden's shape without its last dimension: hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise LinearCrossEntropyError(f"labels must hold integer class indices, got dtype {labels.dtype}.")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise LinearCrossEntropyError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}.")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise LinearCrossEntropyError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}.")
    if reduction not in ("mean", "sum"):
        raise LinearCrossEntropyError(
            f"reduction must be 'mean' or 'sum', got {reduction!r} (per-token losses would need the logits' gradient per token; "
            "use F.cross_entropy on the logits for that)."
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise LinearCrossEntropyError(f"chunk_size must be a positive number of tokens or None, got {chunk_size!r}.")
    if backend not in ("auto", "chunked", "liger"):
        raise LinearCrossEntropyError(f"backend must be 'auto', 'chunked' or 'liger', got {backend!r}.")


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in here: the autocast dtype if autocast is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


# -- liger-kernel (optional) ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def liger_available() -> bool:
    """Whether liger-kernel's fused linear cross-entropy can be imported (asked once per process)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or broken against this torch/triton: use the portable path
        return False
    return True


def _use_liger(backend: str, hidden: Tensor) -> bool:
    if backend == "chunked":
        return False
    if backend == "liger":
        if not liger_available():
            raise LinearCrossEntropyError(
                "backend='liger' needs liger-kernel: pip install liger-kernel (or use backend='auto' or 'chunked')."
            )
        return True
    return hidden.device.type == "cuda" and liger_available()


def _liger_sum(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int) -> Tensor:
    """Summed loss from liger's fused kernel; the mean is taken by the caller, which also makes an all-ignored
    batch 0 instead of liger's 0/0."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(
        input=hidden.contiguous(), weight=weight, target=labels.contiguous(), bias=bias, ignore_index=ignore_index, reduction="sum",
    )
    loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return loss.float()


# -- the portable chunked implementation ------------------------------------------------------------------
class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients one token chunk at a time, in forward; backward only scales them.

    Computing the gradients while the chunk's logits exist costs the same three matmuls as the plain path
    (no recompute) and keeps nothing of size ``vocab`` past a chunk: what is saved for backward is the
    hidden-sized input gradient (and the weight gradient when the weight is trained).
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, scale: Tensor,
                ignore_index: int, chunk_size: int, compute_dtype: torch.dtype) -> Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        any_grad = need_hidden or need_weight or need_bias
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros_like(weight) if need_weight else None
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_bias else None
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size].to(compute_dtype)
                y = labels[start:start + chunk_size]
                valid = y != ignore_index
                target = torch.where(valid, y, 0).unsqueeze(1)
                logits = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
                z = logits.float()  # the softmax in fp32, from logits rounded to the compute dtype as F.linear's are
                del logits
                picked = z.gather(1, target).squeeze(1)
                top = z.amax(dim=1, keepdim=True)
                z.sub_(top).exp_()  # in place: z now holds exp(logit - max)
                norm = z.sum(dim=1, keepdim=True)
                total += torch.where(valid, top.squeeze(1) + norm.squeeze(1).log() - picked, 0.0).sum()
                if not any_grad:
                    continue
                # d(loss * scale)/d(logits) = (softmax - onehot) * scale on counted rows, 0 on ignored ones; in place
                weight_of_row = (valid.float() * scale).unsqueeze(1)
                z.mul_(weight_of_row / norm)
                z.scatter_add_(1, target, -weight_of_row)
                g = z.to(compute_dtype)
                del z
                if need_hidden:
                    grad_hidden[start:start + chunk_size] = torch.mm(g, w)
                if need_weight:
                    grad_weight.addmm_(g.t().to(weight.dtype), h.to(weight.dtype))
                if need_bias:
                    grad_bias += g.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        out: list[Optional[Tensor]] = [None] * 8
        if grad_hidden is not None:
            out[0] = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            out[1] = grad_weight * grad_output.to(grad_weight.dtype)
        if grad_bias is not None:
            out[2] = grad_bias * grad_output
        return tuple(out)


# -- a Hugging Face causal LM -------------------------------------------------------------------------------
# Config fields with which a model's logits are not lm_head(hidden): such models take the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# Models whose returned logits were found not to be lm_head(hidden), and why (checked once per model).
_logits_differ: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_head_checked: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def chunked_loss_unsupported(model: nn.Module) -> Optional[str]:
    """Why ``causal_lm_loss`` takes the plain path for ``model`` (None: it takes the chunked one)."""
    if model in _logits_differ:
        return _logits_differ[model]
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    reason = None
    if _is_vocab_parallel(head):
        pass  # a plain linear whose rows are split across ranks: vocab_parallel_cross_entropy computes its loss
    elif not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        kind = "none" if head is None else type(head).__name__
        reason = f"its output head is {kind}, not a plain nn.Linear (LoRA or quantization on lm_head are computed through the module)"
    elif getattr(model, "base_model", model) is model:
        reason = "it has no separate backbone (base_model) to take the final hidden states from"
    elif _keep_argument(model) is None:
        reason = "its forward has no logits_to_keep argument, so it would compute the full logits anyway"
    else:
        config = getattr(model, "config", None)
        for name in _LOGIT_TRANSFORMS:
            value = getattr(config, name, None)
            if value not in (None, 1, 1.0):
                reason = f"its config sets {name}={value!r}: its logits are not lm_head(hidden)"
                break
    return reason


def _keep_argument(model: nn.Module) -> Optional[str]:
    return _keep_argument_of(type(model))


@functools.lru_cache(maxsize=None)
def _keep_argument_of(cls: type) -> Optional[str]:
    params = inspect.signature(cls.forward).parameters
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    mode: LossMode = "chunked",
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: Backend = "auto",
) -> Tensor:
    """Mean next-token loss of a Hugging Face causal LM, as ``model(..., labels=labels).loss`` computes it.

    ``mode="chunked"`` calls the whole model (so FSDP2's and DDP's hooks on it run as usual) with
    ``logits_to_keep=1``, takes the final hidden states from its backbone's output, and applies
    ``linear_cross_entropy`` with the head's weight (tied or not), shifting the labels as HF does. Models whose
    logits are not a plain linear of the hidden states (LoRA or NF4 on ``lm_head``, soft-capped or scaled
    logits) take the plain path, with a warning; ``chunked_loss_unsupported`` says why. Unlike HF's loss, a
    batch whose every label is ``ignore_index`` gives 0, not NaN.

    Under ``NF4FSDPStrategy`` with the vocabulary tables split by rows (``vocab_parallel``), the head is never
    gathered: the loss is ``vocab_parallel_cross_entropy`` (a collective: every rank calls it), ``backend`` is not
    used, and ``mode="plain"`` works too (the head then returns the full logits, as HF's loss needs).
    """
    if mode not in ("chunked", "plain"):
        raise LinearCrossEntropyError(f"loss mode must be 'chunked' or 'plain', got {mode!r}.")
    if mode == "plain":
        return _plain(model, input_ids, labels, attention_mask)
    reason = chunked_loss_unsupported(model)
    if reason is not None:
        _warn_once(model, reason)
        return _plain(model, input_ids, labels, attention_mask)
    head = model.get_output_embeddings()
    parallel = _is_vocab_parallel(head)
    captured: list[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)

    handle = model.base_model.register_forward_hook(keep)
    lookup = model.get_input_embeddings() if parallel else None
    if lookup is not None and hasattr(lookup, "last_counts"):
        lookup.last_counts = None  # set again by this forward's lookup (every rank's token count)
    try:
        # a vocabulary-parallel head makes only its local columns once the model's logits were checked: none are read
        with _local_logits(head, parallel and model in _head_checked):
            output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **{_keep_argument(model): 1})
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of {type(model.base_model).__name__} in {type(model).__name__}'s forward, saw {len(captured)}")
    if parallel:
        from lightning_nf4.strategies.vocab_parallel import vocab_parallel_cross_entropy

        if not _head_matches(model, captured[0], head.weight, head.bias, output.logits, head=head):
            return _plain(model, input_ids, labels, attention_mask)
        # the hidden states are those of this forward's tokens: the lookup's exchanged counts are theirs
        counts = getattr(lookup, "last_counts", None)
        return vocab_parallel_cross_entropy(captured[0], head, labels, ignore_index=ignore_index, shift=True, chunk_size=chunk_size,
                                            counts=counts)
    gathered = _unshard_for_loss(model, head)
    try:
        weight = head.weight
        if _is_dtensor(weight):
            raise RuntimeError(
                f"{type(model).__name__}'s output head weight is a sharded DTensor that no fully_shard'ed module of the model "
                "holds; use the plain loss: CausalLMModule(loss='plain') or causal_lm_loss(..., mode='plain')."
            )
        if not _head_matches(model, captured[0], weight, head.bias, output.logits, sharded=bool(gathered)):
            return _plain(model, input_ids, labels, attention_mask)
        return linear_cross_entropy(captured[0], weight, labels, bias=head.bias, ignore_index=ignore_index, shift=True,
                                    chunk_size=chunk_size, backend=backend)
    finally:
        for module in gathered:
            if not torch.is_grad_enabled() or _released_after_loss(module, model.base_model):
                module.reshard()


def _released_after_loss(unit: nn.Module, backbone: nn.Module) -> bool:
    """Whether an FSDP unit gathered for the loss may reshard as soon as the loss is computed: when all it holds
    (outside its own sub-units) is frozen and outside the backbone, as a frozen output head is. The loss's
    backward does not read the head's weight (its gradients were computed in the forward), and FSDP would
    otherwise keep it whole until the end of backward, as this unit's pre-backward hook never runs."""
    from torch.distributed.fsdp import FSDPModule

    from lightning_nf4.strategies.fsdp import own_modules

    inside = {id(p) for p in backbone.parameters()}
    own = [p for m in own_modules(unit, FSDPModule) for p in m.parameters(recurse=False)]
    return bool(own) and all(not p.requires_grad and id(p) not in inside for p in own)


def _is_vocab_parallel(head: Optional[nn.Module]) -> bool:
    if head is None:
        return False
    from lightning_nf4.strategies.vocab_parallel import is_vocab_parallel

    return is_vocab_parallel(head)


def _local_logits(head: nn.Module, on: bool) -> Any:
    from contextlib import nullcontext

    from lightning_nf4.strategies.vocab_parallel import local_logits

    return local_logits(head) if on else nullcontext()


def _plain(model: nn.Module, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss


def _is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _unshard_for_loss(model: nn.Module, head: nn.Module) -> list[nn.Module]:
    """Under FSDP2, gather again what the loss uses after the model's forward has returned, and return it.

    The loss reads the head's weight after the head's FSDP unit may have resharded it, and its gradient
    enters the backbone's output, inside the root's forward, so the root's pre-backward hook (registered on
    the root's outputs) never runs: the root (which holds the final norm) must be gathered for the norm's
    backward. Both are unsharded through FSDP's own ``unshard`` (a no-op where already whole), so the weight
    used is FSDP's unsharded parameter, whose gradient FSDP reduce-scatters, and reshards, after backward.
    """
    from torch.distributed.fsdp import FSDPModule

    def innermost_owner(target: nn.Module) -> Optional[nn.Module]:
        name = next((n for n, m in model.named_modules() if m is target), None)
        if name is None:
            return None
        parts = name.split(".") if name else []
        path = [model] + [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
        return next((m for m in reversed(path) if isinstance(m, FSDPModule)), None)

    owners: list[nn.Module] = []
    for target in (model.base_model, head):
        owner = innermost_owner(target)
        if owner is not None and all(owner is not o for o in owners):
            owners.append(owner)
    for owner in owners:
        owner.unshard()
    return owners


def _head_matches(model: nn.Module, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], logits: Tensor,
                  head: Optional[nn.Module] = None, sharded: bool = False) -> bool:
    """Checked once per model: the logits HF returned for the last position are ``F.linear`` of the captured
    hidden states. A model that fails is warned about and goes the plain way from then on. A vocabulary-parallel
    ``head`` computes the reference itself (its full logits; a collective), and all ranks decide together; so do
    the ranks of an FSDP-``sharded`` model, whose two paths gather different units (one rank alone going the
    plain way would pair its gathers with another rank's other collectives)."""
    if model in _head_checked:
        return True
    parallel = _is_vocab_parallel(head)
    with torch.no_grad():
        last = hidden[:, -1:].to(logits.dtype)
        if parallel:
            ours = head(last).float()  # type: ignore[misc]
        else:
            ours = F.linear(last, weight.to(logits.dtype), None if bias is None else bias.to(logits.dtype)).float()
        theirs = logits[:, -1:].float()
        tol = float(2e-2 * theirs.abs().max().clamp(min=1e-6))
        matches = here = bool(torch.allclose(ours, theirs, rtol=2e-2, atol=tol))
        if parallel or sharded:  # the vocabulary-parallel head's ranks, or all of FSDP's
            group = head.weight.device_mesh.get_group() if parallel else None  # type: ignore[union-attr]
            matches = _all_ranks_agree(matches, logits.device, group)
    if matches:
        _head_checked.add(model)
        return True
    reason = (f"its logits are not lm_head(final hidden states) (largest difference {(ours - theirs).abs().max().item():.3g})"
              if not here else "another rank found its logits are not lm_head(final hidden states)")
    _logits_differ[model] = reason
    _warn_once(model, reason)
    return False


def _all_ranks_agree(flag: bool, device: torch.device, group: Any = None) -> bool:
    """``flag`` and-ed over ``group``'s ranks (the default group: every rank): a choice between paths with
    different collectives is made together."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def _warn_once(model: nn.Module, reason: str) -> None:
    if model not in _warned:
        _warned.add(model)
        warnings.warn(f"causal_lm_loss: {type(model).__name__} takes the plain loss path: {reason}.", stacklevel=3)
