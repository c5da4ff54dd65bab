"""``TextDataModule``: plain text (a file, or Python's own pydoc topics) packed into fixed-length blocks.

Documents are split into train and validation *before* tokenizing, by a seeded shuffle, so held-out
perplexity is measured on text the model never trained on, and the split is the same on every rank.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_nf4.data.resumable import make_loader

PYDOC = "pydoc"


def resolve_name_or_path(name_or_path: str) -> str:
    """``packaged:<name>`` becomes its cached HF folder (converted once); a local folder must exist."""
    from lightning_nf4.loading.packaged import resolve_model_path

    return str(resolve_model_path(name_or_path))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer, given a pad token (EOS) when it has none, so batches can be padded."""
    from transformers import AutoTokenizer

    folder = Path(resolve_name_or_path(name_or_path))
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"No tokenizer in {folder} (none of {', '.join(_TOKENIZER_FILES)}). Save the tokenizer beside the model "
            "(tokenizer.save_pretrained(folder)), or name a folder that has it: CausalLMModule's tokenizer_name_or_path "
            "(the CLI's --model.tokenizer_name_or_path), or a data module's tokenizer_name_or_path."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_source(datamodule: pl.LightningDataModule, given: Optional[str]) -> str:
    """The tokenizer to use: the one given, else the attached model's (its ``tokenizer_name_or_path``, else its
    ``model_name_or_path``)."""
    if given:
        return given
    trainer = getattr(datamodule, "trainer", None)
    module = trainer.lightning_module if trainer is not None else None
    hparams = getattr(module, "hparams", {}) if module is not None else {}
    name = hparams.get("tokenizer_name_or_path") or hparams.get("model_name_or_path")
    if not name:
        raise ValueError(
            f"{type(datamodule).__name__} needs a tokenizer: pass tokenizer_name_or_path, or train a model that has "
            "a model_name_or_path hyperparameter (CausalLMModule), whose tokenizer is then used."
        )
    return name


def read_documents(source: str) -> list[str]:
    """``"pydoc"``: the standard library's help topics (one document each); a file: blank-line-separated paragraphs."""
    if source == PYDOC:
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Text source {source!r} is neither {PYDOC!r} nor an existing file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"Text source {str(path)!r} is not UTF-8 text ({err}); save it as UTF-8.") from err
    docs = [d for d in re.split(r"\n\s*\n", text) if d.strip()]
    return docs if len(docs) >= 2 else [line for line in text.splitlines() if line.strip()]


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint train/val documents, chosen by a seeded shuffle (same result on every run and rank). Identical
    documents count as one, so no held-out text is also trained on (pydoc's "if" and "else" topics are one text)."""
    docs = list(dict.fromkeys(docs))
    if len(docs) < 2:
        raise ValueError(f"Need at least 2 distinct documents (paragraphs or lines) to hold some out for validation, got {len(docs)}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def pack(tokenizer: Any, docs: Sequence[str], block_size: int, max_blocks: Optional[int] = None) -> Tensor:
    """Token ids of ``docs`` joined by EOS and cut into ``[n, block_size]`` (the remainder is dropped)."""
    ids = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    limit = None if max_blocks is None else max_blocks * block_size
    flat: list[int] = []
    for seq in ids:
        flat.extend(seq)
        if eos is not None:
            flat.append(eos)
        if limit is not None and len(flat) >= limit:
            break
    n = len(flat) // block_size if limit is None else min(len(flat), limit) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


class BlockDataset(Dataset):
    """Packed blocks; every token is a target (labels == input_ids, the model shifts them)."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}


def left_pad_collate(pad_id: int) -> Callable[[list[list[int]]], dict[str, Tensor]]:
    """Prompts padded on the left, as ``generate`` needs them (new tokens follow the last real one)."""

    def collate(prompts: list[list[int]]) -> dict[str, Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if prompt:
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    return collate


class HeldOutDataModule(pl.LightningDataModule):
    """A training set and a held-out set (built in ``setup``); the held-out set serves validation and
    test. Subclasses say how a set becomes a loader (``_loader``, through ``resumable.make_loader``: the
    training loader resumes mid-epoch at the next batch) and what ``predict`` reads."""

    train_set: Any
    val_set: Any

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class TextDataModule(HeldOutDataModule):
    """Causal-LM blocks from plain text, with a held-out split for perplexity.

    Args:
        source: ``"pydoc"`` (the standard library's help topics, nothing to install) or a text file path.
        tokenizer_name_or_path: defaults to the model's (``CausalLMModule``'s tokenizer, else its ``model_name_or_path``; ``packaged:`` names allowed).
        block_size: tokens per training example.
        val_fraction: share of documents held out (whole documents, never seen in training).
        max_train_blocks, max_val_blocks: caps on the number of blocks (for quick runs).
        predict_prompts: prompts that ``predict`` continues.
    """

    def __init__(
        self,
        source: str = PYDOC,
        tokenizer_name_or_path: Optional[str] = None,
        block_size: int = 256,
        batch_size: int = 4,
        val_fraction: float = 0.1,
        max_train_blocks: Optional[int] = None,
        max_val_blocks: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        predict_prompts: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}.")
        self.source = source
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.seed = val_fraction, seed
        self.max_train_blocks, self.max_val_blocks = max_train_blocks, max_val_blocks
        self.num_workers = num_workers
        self.predict_prompts = list(predict_prompts or [])
        self.tokenizer: Any = None
        self.train_set: Optional[BlockDataset] = None
        self.val_set: Optional[BlockDataset] = None

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(tokenizer_source(self, self.tokenizer_name_or_path))
        if self.train_set is not None:
            return
        train_docs, val_docs = split_documents(read_documents(self.source), self.val_fraction, self.seed)
        train = pack(self.tokenizer, train_docs, self.block_size, self.max_train_blocks)
        val = pack(self.tokenizer, val_docs, self.block_size, self.max_val_blocks)
        for name, blocks in (("training", train), ("validation", val)):
            if blocks.shape[0] == 0:
                raise ValueError(f"{self.source!r} gives no full {name} block of {self.block_size} tokens; lower block_size or give more text.")
        self.train_set, self.val_set = BlockDataset(train), BlockDataset(val)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return make_loader(dataset, shuffle=shuffle, seed=self.seed, trainer=self.trainer, batch_size=self.batch_size,
                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_prompts:
            raise ValueError("TextDataModule.predict needs prompts: set data.predict_prompts.")
        prompts = self.tokenizer(self.predict_prompts)["input_ids"]
        return DataLoader(prompts, batch_size=self.batch_size, collate_fn=left_pad_collate(self.tokenizer.pad_token_id or 0))
