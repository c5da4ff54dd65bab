"""Vocabulary-parallel input embeddings, output head and cross-entropy for frozen, untied tables under FSDP2.

``fully_shard`` gathers a unit whole for its forward: at a 128k vocabulary each table is 1 GiB in bf16
(Llama-3-8B), and its all-gather needs twice that while it is copied out, the largest item of a sharded QLoRA
step. A frozen table needs no gathering: each rank keeps its rows (``Shard(0)`` over the vocabulary) and the ranks
exchange activations instead (token ids, hidden states, per-token statistics: megabytes, not the table).

- ``VocabParallelEmbedding``: all-gathers the ranks' token ids, looks up those its rows hold (zeros for the
  rest) and reduce-scatters, so each rank gets its own tokens' embeddings.
- ``VocabParallelHead``: the full logits of this rank's tokens (each rank computes its vocabulary columns for
  every rank's tokens; an all-to-all hands each rank its rows), so Hugging Face's logits, its plain loss and
  ``generate`` stay correct. Inside ``causal_lm_loss`` the logits are not read and only the local columns are made.
- ``vocab_parallel_cross_entropy``: the chunked loss of ``lightning_nf4.losses`` over the split vocabulary (max,
  normalizer and target logit all-reduced per chunk; the hidden-state gradient computed in forward).

Every function here is a collective over the tables' device mesh: all ranks call it the same number of times.
Ranks may hold different numbers of tokens (their counts are exchanged first, a few bytes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

VocabParallel = Union[bool, Literal["auto"]]


# -- the modules ------------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Embedding):
    """A frozen ``nn.Embedding`` whose rows are split across ranks (a ``Shard(0)`` DTensor weight), never gathered.

    Keeps every rank's token count of its last lookup (``last_counts``): a loss over the same tokens passes them on
    (``vocab_parallel_cross_entropy(counts=...)``) instead of exchanging them again, a host-side wait on the
    slowest rank at the end of every forward."""

    last_counts: Optional[list[int]] = None

    def forward(self, ids: Tensor) -> Tensor:
        rows, group, rank = _local(self.weight)
        flat = ids.reshape(-1)
        counts = self.last_counts = _counts(flat.numel(), group, flat.device)
        most = max(counts)
        every = _gather_padded(flat, most, group, fill=-1)  # [world * most]; -1 is in no rank's rows
        start = rank * rows.shape[0]
        local = every - start
        mine = (local >= 0) & (local < rows.shape[0])
        with torch.no_grad():  # frozen: nothing of the lookup needs a gradient
            found = F.embedding(torch.where(mine, local, 0), rows).masked_fill_(~mine.unsqueeze(1), 0)
            own = found.new_empty((most, rows.shape[1]))
            dist.reduce_scatter_tensor(own, found, group=group)  # one rank holds each id: the sum is that row
        return own[: flat.numel()].view(*ids.shape, rows.shape[1])


class VocabParallelHead(nn.Linear):
    """A frozen, bias-free ``nn.Linear`` output head whose rows (vocabulary) are split across ranks, never gathered.

    Returns the full logits of this rank's tokens, as the plain head would (``generate`` and HF's own loss read
    them). Under ``local_logits`` it returns only this rank's columns, with no communication: for a caller that
    does not read the logits (``causal_lm_loss`` computes its loss with ``vocab_parallel_cross_entropy``).
    """

    local_only: bool = False

    def forward(self, hidden: Tensor) -> Tensor:
        rows = self.weight.to_local()
        dtype = _compute_dtype(hidden, rows)
        if self.local_only:
            with torch.autocast(hidden.device.type, enabled=False):
                return F.linear(hidden.to(dtype), rows.to(dtype))
        flat = hidden.reshape(-1, hidden.shape[-1])
        group = self.weight.device_mesh.get_group()
        logits = _VocabParallelLogits.apply(flat, rows, group, dtype)
        return logits.view(*hidden.shape[:-1], logits.shape[-1])


def is_vocab_parallel(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` is a table sharded by vocabulary here (its weight is never gathered)."""
    return isinstance(module, (VocabParallelEmbedding, VocabParallelHead))


@contextmanager
def local_logits(head: nn.Module) -> Iterator[None]:
    """While active, a ``VocabParallelHead`` returns its local vocabulary columns only (no communication)."""
    if not isinstance(head, VocabParallelHead):
        yield
        return
    head.local_only = True
    try:
        yield
    finally:
        head.local_only = False


# -- choosing and sharding the tables ------------------------------------------------------------------------
def vocabulary_tables(hf: Optional[nn.Module], world: int, setting: VocabParallel, *, cpu_offload: bool = False
                      ) -> Optional[tuple[nn.Embedding, nn.Linear]]:
    """The input embeddings and output head to shard by vocabulary, or None to leave them to ``fully_shard``.

    ``"auto"``: when both are a plain ``nn.Embedding`` / bias-free ``nn.Linear``, frozen, untied, their rows
    split evenly across ``world`` ranks, not already sharded, and the sharded weights are not offloaded to the
    CPU. ``True``: the same, or an ``NF4ShardingConfigError`` naming what stands in the way; ``False``: None.
    """
    from lightning_nf4.strategies.fsdp import NF4ShardingConfigError

    if setting not in (True, False, "auto"):
        raise NF4ShardingConfigError(f"vocab_parallel={setting!r}: give True, False or 'auto'.")
    if setting is False or world < 2:
        return None
    reason = _why_not(hf, world, cpu_offload)
    if reason is None:
        return hf.get_input_embeddings(), hf.get_output_embeddings()  # type: ignore[union-attr]
    if setting is True:
        raise NF4ShardingConfigError(f"vocab_parallel=True cannot shard the vocabulary tables: {reason}. "
                                     "Use vocab_parallel='auto' (or False) to shard them with fully_shard instead.")
    return None


def _why_not(hf: Optional[nn.Module], world: int, cpu_offload: bool) -> Optional[str]:
    from torch.distributed.fsdp import FSDPModule

    if hf is None or not callable(getattr(hf, "get_input_embeddings", None)) or not callable(getattr(hf, "get_output_embeddings", None)):
        return "the model is not a Hugging Face model with input and output embeddings"
    embeddings, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    if type(embeddings) is not nn.Embedding or embeddings.max_norm is not None:
        return f"the input embeddings are {type(embeddings).__name__}, not a plain nn.Embedding (without max_norm)"
    if type(head) is not nn.Linear or head.bias is not None:
        kind = type(head).__name__ if head is not None else "None"
        return f"the output head is {kind}{' with a bias' if head is not None and head.bias is not None else ''}, not a bias-free nn.Linear (LoRA or modules_to_save on lm_head wrap it)"
    if embeddings.weight is head.weight:
        return "the output head is tied to the input embeddings (tie_word_embeddings)"
    if embeddings.weight.requires_grad or head.weight.requires_grad:
        return "a vocabulary table is trained (its gradient would need the whole table)"
    if isinstance(embeddings, FSDPModule) or isinstance(head, FSDPModule):
        return "a vocabulary table is already a sharding unit (sharding_units names it)"
    if embeddings.weight.shape[0] % world or head.weight.shape[0] % world:
        return f"the vocabulary ({embeddings.weight.shape[0]} rows) does not split evenly across {world} ranks"
    if cpu_offload:
        return "cpu_offload=True keeps sharded weights on the host, where these lookups do not read them"
    return None


def shard_by_vocabulary(tables: tuple[nn.Embedding, nn.Linear], mesh: Any) -> set[nn.Parameter]:
    """Replace each (materialized, on the mesh's device) table's weight by its ``Shard(0)`` rows and give it the
    vocabulary-parallel forward. Returns the new parameters: ``fully_shard`` of the modules holding them must
    ignore them (``ignored_params``), so FSDP2 never gathers them.

    By hand (``distribute_tensor``), not ``fully_shard`` plus a unit that never unshards: FSDP2 has no public way to
    keep a unit sharded through its forward. Like ``fully_shard``, each rank keeps its rows of its own copy (no
    communication): every rank built or loaded the same table. The weight stays a DTensor, so a checkpoint's
    ``full_tensor()`` and ``copy_full_into`` treat it as any other sharded parameter.
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    embeddings, head = tables
    params = set()
    for module, kind in ((embeddings, VocabParallelEmbedding), (head, VocabParallelHead)):
        rows = distribute_tensor(module.weight.detach(), mesh, [Shard(0)], src_data_rank=None)
        module.weight = nn.Parameter(rows, requires_grad=False)
        module.__class__ = kind
        params.add(module.weight)
    return params


# -- the loss ---------------------------------------------------------------------------------------------------
def vocab_parallel_cross_entropy(
    hidden: Tensor,
    head: VocabParallelHead,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum"] = "mean",
    shift: bool = False,
    chunk_size: Optional[int] = None,
    counts: Optional[Sequence[int]] = None,
) -> Tensor:
    """``linear_cross_entropy(hidden, head.weight, labels, ...)`` with the head's rows split across ranks.

    Each rank passes its own tokens and gets the loss over them (the mean over its counted targets, 0 when it
    has none), as ``linear_cross_entropy`` computes it on one rank; the gradient reaches ``hidden`` alone (the
    head is frozen). ``chunk_size`` counts the gathered tokens of all ranks per chunk (default: one chunk's
    fp32 logits of this rank's columns under 128 MiB). ``counts``: every rank's token count, where the caller
    knows them (``VocabParallelEmbedding.last_counts`` of the same tokens); else they are exchanged here. A list
    that does not hold this rank's count is refused before any collective; ranks whose entry it does hold go on,
    and wait in the next collective until the process group's timeout, so pass counts only from an exchange.
    """
    from lightning_nf4.losses import LinearCrossEntropyError, default_chunk_size

    if not isinstance(head, VocabParallelHead):
        raise LinearCrossEntropyError(f"vocab_parallel_cross_entropy needs a VocabParallelHead, got {type(head).__name__}.")
    if reduction not in ("mean", "sum"):
        raise LinearCrossEntropyError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or hidden.shape[-1] != head.weight.shape[1]:
        raise LinearCrossEntropyError(
            f"hidden [..., {head.weight.shape[1]}] and labels [...] must agree: got hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}."
        )
    if shift:
        labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    count = (flat_labels != ignore_index).sum()
    scale = 1.0 / count.clamp(min=1).to(torch.float32) if reduction == "mean" else torch.ones((), device=hidden.device)
    rows, group, rank = _local(head.weight)
    chunk = chunk_size or default_chunk_size(rows.shape[0])
    if counts is not None:
        counts = list(counts)
        if len(counts) != dist.get_world_size(group) or counts[rank] != flat_hidden.shape[0]:
            raise LinearCrossEntropyError(
                f"counts={counts} must hold every rank's token count, this rank's ({rank}) being its {flat_hidden.shape[0]} "
                "hidden rows; pass the counts of the lookup of these very tokens, or leave counts out to exchange them."
            )
    return _VocabParallelCrossEntropy.apply(flat_hidden, rows, flat_labels, scale, group, rank, ignore_index, chunk,
                                            _compute_dtype(flat_hidden, rows), counts)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Loss and hidden-state gradient chunk by chunk in forward, over every rank's tokens and this rank's columns.

    The ranks' hidden states and labels are all-gathered; for each chunk of them every rank takes the logits of
    its columns, and the row max (MAX), normalizer and target logit (SUM) are all-reduced, so each rank knows
    every token's loss. The gradient of the loss to the hidden states is this rank's columns' share; one
    reduce-scatter at the end sums the shares and hands each rank its own tokens' rows. Nothing vocabulary-sized
    outlives a chunk; backward only scales the saved gradient.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, rows: Tensor, labels: Tensor, scale: Tensor, group: Any, rank: int,
                ignore_index: int, chunk_size: int, compute_dtype: torch.dtype, counts: Optional[list[int]]) -> Tensor:
        if ctx.needs_input_grad[1]:
            raise RuntimeError("the vocabulary-parallel loss cannot train the head: its rows are never gathered.")
        need_hidden = ctx.needs_input_grad[0]
        world, n, columns = dist.get_world_size(group), hidden.shape[0], rows.shape[0]
        start = rank * columns
        with torch.autocast(hidden.device.type, enabled=False):
            most = max(counts or _counts(n, group, hidden.device))
            w = rows.to(compute_dtype)
            every = _gather_padded(hidden.to(compute_dtype), most, group, fill=0)
            targets = _gather_padded(labels, most, group, fill=ignore_index)
            scales = torch.empty(world, dtype=torch.float32, device=hidden.device)
            dist.all_gather_into_tensor(scales, scale.reshape(1).to(torch.float32), group=group)
            row_scale = scales.repeat_interleave(most)  # each rank's own mean
            losses = torch.zeros(world * most, dtype=torch.float32, device=hidden.device)
            grad_every = torch.zeros(every.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
            for s in range(0, world * most, chunk_size):
                h, y = every[s:s + chunk_size], targets[s:s + chunk_size]
                valid = y != ignore_index
                local = y - start
                mine = valid & (local >= 0) & (local < columns)
                target = torch.where(mine, local, 0).unsqueeze(1)
                z = torch.mm(h, w.t()).float()  # logits rounded to the compute dtype, softmax in fp32, as the chunked loss
                top = z.amax(dim=1, keepdim=True)
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
                picked = torch.where(mine, z.gather(1, target).squeeze(1), 0.0)
                z.sub_(top).exp_()
                sums = torch.stack([z.sum(dim=1), picked], dim=1)
                dist.all_reduce(sums, group=group)
                norm = sums[:, :1]
                losses[s:s + chunk_size] = torch.where(valid, top.squeeze(1) + norm.squeeze(1).log() - sums[:, 1], 0.0)
                if need_hidden:
                    weight_of_row = (valid.float() * row_scale[s:s + chunk_size]).unsqueeze(1)
                    z.mul_(weight_of_row / norm)
                    z.scatter_add_(1, target, -(weight_of_row * mine.float().unsqueeze(1)))
                    grad_every[s:s + chunk_size] = torch.mm(z.to(compute_dtype), w).float()
                del z
            grad_hidden = None
            if need_hidden:
                own = grad_every.new_empty((most, every.shape[1]))
                dist.reduce_scatter_tensor(own, grad_every, group=group)  # summed in fp32 over the ranks' columns
                grad_hidden = own[:n].to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return losses[rank * most: rank * most + n].sum() * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        (grad_hidden,) = ctx.saved_tensors
        out: list[Optional[Tensor]] = [None] * 10
        if grad_hidden is not None:
            out[0] = grad_hidden * grad_output.to(grad_hidden.dtype)
        return tuple(out)


class _VocabParallelLogits(torch.autograd.Function):
    """Full logits of this rank's tokens from every rank's columns: all-gather hidden states, local matmul,
    all-to-all. Backward runs the same exchange the other way and reduce-scatters the hidden-state gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, rows: Tensor, group: Any, compute_dtype: torch.dtype) -> Tensor:
        if ctx.needs_input_grad[1]:
            raise RuntimeError("a vocabulary-parallel head cannot be trained: its rows are never gathered.")
        world, n = dist.get_world_size(group), hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            most = max(_counts(n, group, hidden.device))
            every = _gather_padded(hidden.to(compute_dtype), most, group, fill=0)
            part = torch.mm(every, rows.to(compute_dtype).t())  # [world * most, columns]: every rank's tokens, my columns
            mine = torch.empty_like(part)
            dist.all_to_all_single(mine, part, group=group)  # block r: my tokens, rank r's columns
            logits = mine.view(world, most, -1).transpose(0, 1).reshape(most, -1)[:n]
        ctx.save_for_backward(rows)
        ctx.shape = (world, most, n, compute_dtype, hidden.dtype, group)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        (rows,) = ctx.saved_tensors
        world, most, n, compute_dtype, hidden_dtype, group = ctx.shape
        padded = grad.new_zeros((most, grad.shape[1]))
        padded[:n] = grad
        blocks = padded.view(most, world, -1).transpose(0, 1).reshape(world * most, -1).to(compute_dtype).contiguous()
        theirs = torch.empty_like(blocks)
        dist.all_to_all_single(theirs, blocks, group=group)  # block r: rank r's tokens, my columns
        share = torch.mm(theirs, rows.to(compute_dtype)).float()
        own = share.new_empty((most, share.shape[1]))
        dist.reduce_scatter_tensor(own, share, group=group)
        return own[:n].to(hidden_dtype), None, None, None


# -- helpers --------------------------------------------------------------------------------------------------------
def _local(weight: Tensor) -> tuple[Tensor, Any, int]:
    """This rank's rows of a ``Shard(0)`` DTensor weight, its mesh's process group and this rank's place in it."""
    mesh = weight.device_mesh
    return weight.to_local(), mesh.get_group(), mesh.get_local_rank()


_HOST_GROUPS: dict[Any, Any] = {}


def _host_group(group: Any) -> Any:
    """A gloo group over ``group``'s ranks, made once (every rank reaches the first call at the same point of the
    first step): numbers the host needs travel host to host, so the device stream never drains for them."""
    if dist.get_backend(group) == "gloo":
        return group
    found = _HOST_GROUPS.get(group)
    if found is None:
        found = _HOST_GROUPS[group] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
    return found


def _counts(n: int, group: Any, device: torch.device) -> list[int]:
    """Every rank's token count (ranks' batches may differ in length): a few bytes, exchanged on the host. Through
    the device they cost a stream sync each, two or three per step, which stalls a host that should run ahead."""
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.int64), group=_host_group(group))
    return [int(c) for c in counts]


def _gather_padded(t: Tensor, most: int, group: Any, fill: float) -> Tensor:
    """``t`` ([n, ...]) of every rank, each padded with ``fill`` to ``most`` rows: ``[world * most, ...]``."""
    if t.shape[0] < most:
        t = torch.cat([t, t.new_full((most - t.shape[0], *t.shape[1:]), fill)])
    out = t.new_empty((dist.get_world_size(group) * most, *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)
