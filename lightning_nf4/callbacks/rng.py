"""Random-number state in checkpoints: a resumed run draws the dropout masks and shuffles an uninterrupted one draws.

Lightning saves no generator state, so after a resume LoRA dropout and a shuffling loader draw from wherever
the new process starts. ``RNGCheckpoint`` stores each process's Python, NumPy, torch CPU and accelerator
(CUDA or XPU) states in the checkpoint, gathered from every rank, and puts them back on the same ranks.
Everything is stored as plain tensors, so a weights-only load needs nothing allow-listed.

When they are put back matters. At an epoch boundary they are restored when fit starts (after the model,
optimizers and checkpoint are set up, before the loader's iterator and the next epoch's shuffle draw from
them: exactly where the uninterrupted run stood). Where Lightning makes the loader's iterator again as the next
epoch starts, after the one made when fit set up its data (a checkpoint saved by a validation in an epoch's last
batch, or at an epoch's end with a validation loader), they are restored again as that epoch starts. A resume
inside an epoch restores them again just before the next batch, since creating the loader's iterator drew from
them in between. Validation inside fit leaves them as it found them: a checkpoint saved at a batch's end precedes
a validation that a resumed run does not repeat.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor

_ACCELERATORS = ("cuda", "xpu")


def capture(device: Optional[torch.device] = None) -> dict[str, Tensor]:
    """This process's generator states as tensors; with a CUDA or XPU ``device``, that device's state too."""
    (_, words, gauss), (_, keys, pos, has_gauss, cached), cpu, accelerator = _snapshot(device)
    states = {
        "python": torch.tensor(words, dtype=torch.int64),  # 624 state words and the position
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos_gauss": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": cpu,
    }
    if accelerator is not None:
        states[device.type] = accelerator
    return states


def restore(states: dict[str, Tensor], device: Optional[torch.device] = None) -> None:
    """Put back what ``capture`` returned (the accelerator's state only onto a device of the same type)."""
    has_gauss, gauss = states["python_gauss"].tolist()
    pos, np_has_gauss, cached = states["numpy_pos_gauss"].tolist()
    accelerator = states[device.type].cpu() if device is not None and device.type in states else None
    _put_back((
        (3, tuple(states["python"].tolist()), gauss if has_gauss else None),
        ("MT19937", states["numpy"].numpy().astype(np.uint32), int(pos), int(np_has_gauss), cached),
        states["torch"].cpu(), accelerator,
    ), device)


def _snapshot(device: Optional[torch.device]) -> tuple[Any, ...]:
    """The generators' states in their own forms: ``capture`` converts them to tensors; a copy taken at every
    training batch's end and never written skips that (a third of the host time)."""
    accelerator = getattr(torch, device.type).get_rng_state(device) if device is not None and device.type in _ACCELERATORS else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), accelerator


def _put_back(snapshot: tuple[Any, ...], device: Optional[torch.device]) -> None:
    python, numpy, cpu, accelerator = snapshot
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if accelerator is not None:
        getattr(torch, device.type).set_rng_state(accelerator, device)


class RNGCheckpoint:
    """Saves every rank's generator states into a checkpoint and restores them on resume (used by LoRACallback).

    ``save`` is a collective (all ranks call ``on_save_checkpoint`` in Lightning); the result is one tensor per
    generator with a leading rank dimension, written once by rank 0."""

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Tensor]] = None
        self._again_before_batch = False
        self._fit_started = False
        self._held: Optional[tuple[Any, ...]] = None  # the states a validation inside fit found, put back after it

    def save(self, trainer: Any) -> dict[str, Any]:
        strategy = trainer.strategy
        mine = capture(strategy.root_device)
        world = trainer.world_size
        gathered = {}
        for name, tensor in mine.items():
            if world > 1:
                tensor = strategy.all_gather(tensor.to(strategy.root_device)).cpu()
            gathered[name] = tensor.reshape(world, *mine[name].shape).cpu()
        loop = trainer.fit_loop.epoch_loop.batch_progress
        return {"states": gathered, "mid_epoch": not loop.is_last_batch}

    def load(self, trainer: Any, saved: dict[str, Any]) -> None:
        states = saved["states"]
        saved_world = next(iter(states.values())).shape[0]
        if saved_world != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds the random-number states of {saved_world} process(es), this run has "
                f"{trainer.world_size}: they are not restored, so dropout and shuffling after the resume differ from an "
                "uninterrupted run. Resume with the same number of devices for an exact continuation."
            )
            return
        # a copy, not a view into the gathered rows: torch's set_rng_state misreads a tensor with a storage offset
        self._pending = {name: value[trainer.global_rank].clone() for name, value in states.items()}
        self._again_before_batch = bool(saved["mid_epoch"])
        if self._fit_started:  # strategies that restore after setup (e.g. FSDP) load after on_fit_start
            self._apply(trainer, keep=True)

    def on_fit_start(self, trainer: Any) -> None:
        self._fit_started = True
        if self._pending is not None:
            self._apply(trainer, keep=True)

    def on_train_epoch_start(self, trainer: Any) -> None:
        if not self._again_before_batch and self._pending is not None and _iterator_made_again(trainer):
            self._apply(trainer, keep=False)

    def on_train_batch_start(self, trainer: Any) -> None:
        if self._again_before_batch and self._pending is not None:
            self._apply(trainer, keep=False)
        self._pending, self._again_before_batch = None, False  # kept for the time before the first batch only

    def hold_during_validation(self, trainer: Any) -> None:
        """Called at each training batch's end. Validation inside fit draws from the generators (a loader without a
        generator of its own draws its base seed when its iterator is made, before any validation hook) between a
        checkpoint saved at a batch's end and the next batch, and a run resumed from that checkpoint does not repeat
        that validation. So a validation's end puts back the states of the batch end before it
        (``resume_after_validation``)."""
        self._held = _snapshot(trainer.strategy.root_device)

    def resume_after_validation(self, trainer: Any) -> None:
        held, self._held = self._held, None
        if held is not None:
            _put_back(held, trainer.strategy.root_device)

    def on_fit_end(self) -> None:
        self._pending, self._again_before_batch, self._fit_started, self._held = None, False, False, None

    def _apply(self, trainer: Any, keep: bool) -> None:
        restore(self._pending, trainer.strategy.root_device)
        if not keep:
            self._pending = None


def _iterator_made_again(trainer: Any) -> bool:
    """Lightning's own test (``_TrainingEpochLoop.on_run_start``) for making the training loader's iterator again as
    an epoch starts rather than using the one made when fit set up its data."""
    fit_loop = trainer.fit_loop
    return trainer.current_epoch > 0 and not getattr(fit_loop, "is_resuming", False) and not fit_loop.epoch_loop.restarting
