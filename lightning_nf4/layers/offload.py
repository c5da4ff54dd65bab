"""Activations saved for backward, kept in host memory from the forward to the backward.

Under activation checkpointing what a step keeps between its forward and backward is each decoder layer's
input (at Llama-3-8B shape and 2048 tokens, 16 MiB a layer, 0.5 GiB in all; 2.5 GiB at 70B shape), the part
of the peak that does not shrink with sharding. ``offload_activations()`` is a ``saved_tensors_hooks`` pair
that copies each such tensor to pinned host memory as autograd saves it and back as backward reads it.

The copies are issued on the current stream without waiting (``non_blocking``): the device-to-host copy runs
before any later kernel could reuse the tensor's memory, and the copy back runs before the backward that
reads it, both by stream order; the host never waits, so a host-bound step keeps running ahead of the device.
Only activations move: tensors made by a differentiable op of this step (they have a ``grad_fn``), not views of
parameters, at least ``min_bytes`` large. Model state stays where it is, frozen or not: a parameter, a view of one,
a frozen weight's local shard or its autocast copy (no ``grad_fn``: a sharded output head is saved by the loss
every step, and copying its 0.5 GiB out and back would cost more than it frees), a tensor subclass (an
``NF4Tensor``, a ``DTensor``); so do tensors already in host memory, and small ones, whose copies cost more host
time than they free.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Union

import torch
from torch import Tensor, nn

Packed = Union[Tensor, tuple[torch.device, Tensor]]


class ActivationOffload:
    """The pack and unpack hooks: ``pack`` returns the tensor itself, or ``(device, host copy)``."""

    __slots__ = ("min_bytes", "pin_memory", "offloaded_bytes")

    def __init__(self, min_bytes: int = 1 << 20, pin_memory: bool = True) -> None:
        if not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"min_bytes must be a number of bytes, 0 or more; got {min_bytes!r}.")
        self.min_bytes = min_bytes
        self.pin_memory = pin_memory
        self.offloaded_bytes = 0  # since this hook pair was made: what left the device

    def is_activation(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is an activation worth moving, wherever it is (see the module's docstring for why)."""
        if type(tensor) is not Tensor or tensor.grad_fn is None:
            return False  # a Parameter, a subclass, or not made by this step's graph
        if tensor._is_view() and isinstance(tensor._base, nn.Parameter):
            return False
        if not tensor.is_contiguous() or tensor.is_sparse:
            return False  # a host copy of its storage would be another layout; few activations are
        return tensor.numel() * tensor.element_size() >= self.min_bytes

    def keeps(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` stays where it is: not an activation, or in host memory already."""
        return tensor.device.type in ("cpu", "meta") or not self.is_activation(tensor)

    def pack(self, tensor: Tensor) -> Packed:
        if self.keeps(tensor):
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self.pin_memory)
        host.copy_(tensor, non_blocking=self.pin_memory)
        self.offloaded_bytes += host.numel() * host.element_size()
        return tensor.device, host

    @staticmethod
    def unpack(packed: Packed) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())


@contextmanager
def offload_activations(min_bytes: int = 1 << 20, pin_memory: bool = True) -> Iterator[ActivationOffload]:
    """Within this context, tensors autograd saves for backward wait in host memory (see the module docstring).

    Use it around a training step's forward; the backward may run outside it. Under activation checkpointing
    only each checkpointed region's inputs are saved outside the region, so only those move.
    ``pin_memory=False`` makes the copies synchronous (pageable memory cannot be copied asynchronously).
    """
    hooks = ActivationOffload(min_bytes, pin_memory and _can_pin())
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield hooks


def _can_pin() -> bool:
    """Pinned host memory needs an accelerator (CUDA, XPU); without one there is nothing to offload from."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
