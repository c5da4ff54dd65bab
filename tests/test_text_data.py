"""TextDataModule's held-out split: whole documents (pydoc topics) are held out, none seen in training."""

import pytest
import torch

from lightning_nf4.data.text import TextDataModule, pack, read_documents, split_documents
from tests.test_cli import tiny_tokenizer


def test_pydoc_topics_are_held_out_whole():
    """The validation documents are whole pydoc topics whose text never occurs in training, for every seed (pydoc
    has two topics, "if" and "else", with the same text); the split is the same on every run and rank."""
    from pydoc_data.topics import topics

    docs = read_documents("pydoc")
    assert docs == [topics[key] for key in sorted(topics)]
    distinct = set(docs)
    for seed in range(6):
        for fraction in (0.1, 0.25):
            train, val = split_documents(docs, fraction, seed)
            assert val and train and set(val) <= distinct and set(train) <= distinct
            assert set(train).isdisjoint(val), f"seed {seed}: {len(set(train) & set(val))} held-out document(s) also in training"
            assert set(train) | set(val) == distinct
            assert len(val) == round(fraction * len(distinct))
            assert split_documents(docs, fraction, seed) == (train, val)
    assert split_documents(docs, 0.1, 0)[1] != split_documents(docs, 0.1, 1)[1]


def test_duplicate_documents_count_once():
    docs = ["a", "b", "a", "c", "b", "d"]
    for seed in range(20):
        train, val = split_documents(docs, 0.5, seed)
        assert set(train).isdisjoint(val) and set(train) | set(val) == {"a", "b", "c", "d"} and len(val) == 2
    with pytest.raises(ValueError, match="at least 2 distinct documents"):
        split_documents(["same", "same"], 0.5, 0)


def test_data_module_packs_each_side_from_its_own_documents(tmp_path):
    """The blocks the module trains and validates on are the packed tokens of the two sides of the split."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    dm = TextDataModule(source="pydoc", tokenizer_name_or_path=str(tmp_path), block_size=64, val_fraction=0.1,
                        max_train_blocks=40, max_val_blocks=10)
    dm.setup("fit")
    train, val = split_documents(read_documents("pydoc"), 0.1, 0)
    assert torch.equal(dm.val_set.blocks, pack(dm.tokenizer, val, 64, 10))
    assert torch.equal(dm.train_set.blocks, pack(dm.tokenizer, train, 64, 40))
    assert dm.val_set.blocks.shape == (10, 64) and dm.train_set.blocks.shape == (40, 64)
