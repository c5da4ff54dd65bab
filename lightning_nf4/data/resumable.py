"""Loaders that resume inside an epoch: the same batches after a restart as in an uninterrupted run.

Lightning saves ``state_dict()`` of a training loader that has one and, when a run restarts inside an epoch,
hands it back through ``load_state_dict`` before iterating. ``ResumableDataLoader``'s state is its sampler's
epoch and how many batches this epoch's iterator has handed out; the next iterator skips that many. That
needs an order that depends only on the epoch, never on the global generator: the data modules use a
``DistributedSampler`` (seed + epoch; one replica on one device, Lightning's sharding under DDP), and their
loaders draw worker seeds from their own generator, so iterating data leaves dropout's randomness alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any, Optional

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch is saved with the checkpoint and skipped to on resume."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handed_out = 0  # batches of the current epoch given to the training loop
        self._skip = 0  # batches the next iterator passes over (set by load_state_dict)
        self._trainer: Optional[weakref.ref] = None

    def follow(self, trainer: Any) -> "ResumableDataLoader":
        """Take each epoch's number from ``trainer.current_epoch`` when an epoch's first batch is drawn. Lightning's
        own ``set_epoch`` call is one ahead after a resume at an epoch's end (it counts the finished epoch twice),
        which would give the resumed run another order than the uninterrupted one."""
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        return self

    def _epoch_now(self) -> Optional[int]:
        trainer = self._trainer() if self._trainer is not None else None
        return int(trainer.current_epoch) if trainer is not None and trainer.training else None

    def __iter__(self) -> Iterator[Any]:
        return _ResumingIterator(self)

    def _epoch_length(self) -> int:
        """Batches in an epoch as the trainer runs it: ``limit_train_batches`` can end an epoch before the loader does."""
        trainer = self._trainer() if self._trainer is not None else None
        limit = getattr(trainer, "num_training_batches", float("inf")) if trainer is not None else float("inf")
        return int(min(len(self), limit)) if limit != float("inf") else len(self)

    def _layout(self) -> dict[str, int]:
        """What a count of batches means: the batch size, the dataset's length and the sampler's number of replicas."""
        return {"batch_size": int(self.batch_size or 1), "samples": len(self.dataset),  # type: ignore[arg-type]
                "replicas": int(getattr(self.sampler, "num_replicas", 1))}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches": self._handed_out,
                "finished": int(self._handed_out >= self._epoch_length()), **self._layout()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(int(state["epoch"]))
        batches = int(state["batches"])
        finished = bool(state["finished"]) if "finished" in state else batches >= len(self)
        self._skip = 0 if finished else self._batches_to_skip(state, batches)  # a finished epoch: the next one starts afresh

    def _batches_to_skip(self, state: dict[str, int], batches: int) -> int:
        """The saved count, in this loader's batches: Lightning's restored progress counts the same number of batches
        as done. So a resume inside an epoch is exact only with the same batch size, dataset and number of processes;
        with others it skips or repeats samples, and says so."""
        saved, now = {k: int(state[k]) for k in self._layout() if k in state}, self._layout()
        changed = {k: (saved[k], now[k]) for k in saved if saved[k] != now[k]}
        if changed and batches:
            rank_zero_warn(
                f"ResumableDataLoader: resuming inside an epoch with another {', '.join(f'{k} ({a} -> {b})' for k, (a, b) in changed.items())}: "
                f"the {batches} batches trained before count as done, so the rest of this epoch skips or repeats samples. "
                "Resume with the same batch size, data and number of processes for an exact continuation."
            )
        return batches


class _ResumingIterator(Iterator):
    """Makes the real iterator at the first batch (after Lightning's ``set_epoch``), skips what was trained on,
    and counts what it hands out. Skipped batches are loaded and dropped: the loaders here hold tokenized
    data in memory, so that costs little and works with any sampler and any number of workers."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.inner: Optional[Iterator[Any]] = None

    def __next__(self) -> Any:
        loader = self.loader
        if self.inner is None:
            epoch, set_epoch = loader._epoch_now(), getattr(loader.sampler, "set_epoch", None)
            if epoch is not None and callable(set_epoch):
                set_epoch(epoch)
            self.inner = DataLoader.__iter__(loader)
            skip, loader._skip = loader._skip, 0
            loader._handed_out = 0
            for _ in range(skip):
                next(self.inner)
                loader._handed_out += 1
        batch = next(self.inner)
        loader._handed_out += 1
        return batch


def make_loader(
    dataset: Dataset,
    *,
    shuffle: bool,
    seed: int,
    trainer: Any = None,
    **kwargs: Any,
) -> DataLoader:
    """The training loader (``shuffle=True``: seed + epoch order, resumable) or an evaluation loader (in order).
    Both draw worker seeds from their own generator, never from the global one."""
    generator = torch.Generator().manual_seed(seed)
    if not shuffle:
        return DataLoader(dataset, shuffle=False, generator=generator, **kwargs)
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return ResumableDataLoader(dataset, sampler=sampler, generator=generator, **kwargs).follow(trainer)
