"""The data modules' promises, each checked alone: instruction examples masked, cut and split as documented (fast and
Python tokenizers, chat templates), text packed with EOS between documents and split by the module's seed, and the
resumable loaders giving each rank its own share, in the seed's order, with evaluation in order."""

import json

import pytest
import torch

from tests.test_cli import RECORDS, tiny_tokenizer
from tests.test_cli_user import _instruction_module


# -- instruction data --------------------------------------------------------------------------------------------
def test_an_example_whose_prompt_fills_max_length_is_dropped_with_a_warning(tmp_path):
    """Cut to max_length, an example whose response starts past it has no label to learn: it is dropped (a batch of
    such examples would give a loss over no tokens), and a set of only such examples is refused."""
    from lightning_nf4.data.instruction import InstructionDataError

    long = {"instruction": "Reverse the word. " * 20, "output": "god"}
    records = [long, *RECORDS]
    module = _instruction_module(tmp_path, records, val_file=None, max_length=40, val_fraction=0.2, seed=0)
    with pytest.warns(UserWarning, match=r"dropped 1 .* example"):
        encoded = module._encode_all([{**long, "input": ""}, {**RECORDS[0]}], "training")
    assert len(encoded) == 1 and any(label != -100 for label in encoded[0]["labels"][1:])
    with pytest.raises(InstructionDataError, match="No training example has a response token within max_length=40"):
        module._encode_all([{**long, "input": ""}], "training")


def test_truncated_labels_stay_aligned_with_their_input_ids(tmp_path):
    """max_length cuts input ids and labels at the same end: label i is the id at position i, or -100."""
    module = _instruction_module(tmp_path, RECORDS, max_length=12)
    record = {"instruction": "Count to three.", "input": "", "output": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10"}
    full = _instruction_module(tmp_path, RECORDS, max_length=512).encode(record)
    cut = module.encode(record)
    assert len(full["input_ids"]) > 12
    assert cut["input_ids"] == full["input_ids"][:12] and cut["labels"] == full["labels"][:12]


@pytest.mark.parametrize("bad", [5, ["2", "3"], None])
def test_an_input_that_is_not_a_string_names_its_line(tmp_path, bad):
    from lightning_nf4.data.instruction import InstructionDataError, read_jsonl

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[1]) + "\n" + json.dumps({"instruction": "Add.", "input": bad, "output": "5"}) + "\n")
    with pytest.raises(InstructionDataError, match=r"line 2: 'input' must be a string"):
        read_jsonl(path)


def test_the_instruction_split_follows_the_seed(tmp_path):
    """Another seed holds other records out (and the same seed the same ones)."""
    records = [{"instruction": f"Task {i}.", "output": f"Answer {i}."} for i in range(20)]

    def held(seed):
        module = _instruction_module(tmp_path, records, val_fraction=0.25, seed=seed)
        module.setup("fit")
        return [r["instruction"] for r in module.val_records]

    by_seed = {seed: held(seed) for seed in range(4)}
    assert held(2) == by_seed[2]
    assert len({tuple(v) for v in by_seed.values()}) > 1


class _CharTokenizer:
    """Built on demand: a character-level Python ("slow") tokenizer, which gives no offset mapping."""

    @staticmethod
    def make():
        from transformers import PreTrainedTokenizer

        class CharTokenizer(PreTrainedTokenizer):
            def __init__(self, **kwargs):
                chars = sorted(set("".join(json.dumps(r) for r in RECORDS) + "QA:\n ?!.,0123456789abcdefghijklmnopqrstuvwxyz"))
                self.vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
                self.inverse = {i: c for c, i in self.vocab.items()}
                super().__init__(pad_token="<pad>", bos_token="<s>", eos_token="</s>", **kwargs)

            @property
            def vocab_size(self):
                return len(self.vocab)

            def get_vocab(self):
                return dict(self.vocab)

            def _tokenize(self, text, **kwargs):
                return list(text)

            def _convert_token_to_id(self, token):
                return self.vocab[token]

            def _convert_id_to_token(self, index):
                return self.inverse[index]

            def convert_tokens_to_string(self, tokens):
                return "".join(tokens)

        return CharTokenizer()


def test_a_slow_tokenizer_masks_exactly_the_prompt(tmp_path):
    """Without offsets (a Python tokenizer) the labels mask the prompt's own tokens, all of them, and nothing more."""
    tokenizer = _CharTokenizer.make()
    assert not tokenizer.is_fast
    module = _instruction_module(tmp_path, RECORDS, tokenizer=tokenizer)
    record = {"instruction": "Say hello.", "input": "", "output": "Hello!"}
    prompt, response = module.prompt_and_response(record)
    example = module.encode(record)
    n = len(tokenizer(prompt)["input_ids"])
    assert example["input_ids"] == tokenizer(prompt + response)["input_ids"]
    assert example["labels"] == [-100] * n + example["input_ids"][n:]
    assert tokenizer.convert_ids_to_tokens(example["labels"][n:]) == [*"Hello!", "</s>"]


def test_chat_template_generation_prompts_are_the_rendered_template_only(tmp_path):
    """A chat template writes its own special tokens: a generation prompt is its rendering tokenized without the
    tokenizer's (a second BOS here), as encode tokenizes the training text."""
    module = _instruction_module(tmp_path, RECORDS, use_chat_template=True)
    tokenizer = module.tokenizer
    batch = module.generation_batch(["Name a fruit."])
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], tokenize=False, add_generation_prompt=True)
    assert batch["input_ids"][0].tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    record = {"instruction": "Name a fruit.", "input": "", "output": "An apple."}
    n = len(batch["input_ids"][0])
    assert module.encode(record)["input_ids"][:n] == batch["input_ids"][0].tolist()  # the prompt the model trained after


# -- text data ---------------------------------------------------------------------------------------------------
def test_packed_documents_are_joined_by_eos():
    """Each document ends with EOS in the packed stream, so the model learns where a text stops and no block runs
    one document into the next without a boundary."""
    from lightning_nf4.data.text import pack

    tokenizer = tiny_tokenizer()
    docs = ["The quick brown fox.", "A dictionary maps keys.", "def add(a, b): return a + b"]
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = [t for seq in ids for t in (*seq, tokenizer.eos_token_id)]
    blocks = pack(tokenizer, docs, 4)
    assert blocks.flatten().tolist() == stream[: len(stream) // 4 * 4]
    assert (blocks == tokenizer.eos_token_id).sum() >= 2


def test_a_block_cap_gives_the_first_blocks_of_the_uncapped_packing():
    """max_blocks only stops the packing early: the blocks are the first ones the whole text gives."""
    from lightning_nf4.data.text import pack

    tokenizer = tiny_tokenizer()
    docs = ["fox", "dog", "keys", "lists", "values", "order", "Python", "brown"] * 3
    whole = pack(tokenizer, docs, 4)
    for cap in (1, 2, 3, 5):
        assert torch.equal(pack(tokenizer, docs, 4, max_blocks=cap), whole[:cap])

def test_a_val_fraction_of_one_or_more_is_refused():
    from lightning_nf4.data.text import split_documents

    for fraction in (1.0, 1.5, 0.0, -0.1):
        with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
            split_documents(["a", "b", "c"], fraction, 0)


def test_a_file_of_one_paragraph_is_read_line_by_line(tmp_path):
    from lightning_nf4.data.text import read_documents

    path = tmp_path / "one.txt"
    path.write_text("first line\nsecond line\nthird line\n")  # no blank line: one paragraph
    assert read_documents(str(path)) == ["first line", "second line", "third line"]


def test_the_text_split_follows_the_data_modules_seed(tmp_path):
    from lightning_nf4.data.text import TextDataModule, pack, read_documents, split_documents

    tiny_tokenizer().save_pretrained(tmp_path)
    blocks = {}
    for seed in (0, 3):
        dm = TextDataModule(source="pydoc", tokenizer_name_or_path=str(tmp_path), block_size=32, max_train_blocks=4, max_val_blocks=4, seed=seed)
        dm.setup("fit")
        val = split_documents(read_documents("pydoc"), 0.1, seed)[1]
        assert torch.equal(dm.val_set.blocks, pack(dm.tokenizer, val, 32, 4))
        blocks[seed] = dm.val_set.blocks
    assert not torch.equal(blocks[0], blocks[3])


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    from lightning_nf4.data.text import load_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id


def test_left_padded_prompts_attend_to_their_own_tokens_only():
    from lightning_nf4.data.text import left_pad_collate

    batch = left_pad_collate(0)([[5, 6, 7], [8], []])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


# -- resumable loaders -------------------------------------------------------------------------------------------
class _Ranks:
    """What make_loader reads of a trainer: the number of processes and this one's rank."""

    def __init__(self, world_size, global_rank):
        self.world_size, self.global_rank, self.current_epoch, self.training = world_size, global_rank, 0, False


def test_each_rank_trains_on_its_own_share_of_the_data():
    from lightning_nf4.data.resumable import make_loader

    data = list(range(10))
    shares = [[int(i) for batch in make_loader(data, shuffle=True, seed=0, trainer=_Ranks(2, rank), batch_size=1) for i in batch]
              for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert sorted(shares[0] + shares[1]) == data


def test_the_training_order_follows_the_seed():
    from lightning_nf4.data.resumable import make_loader

    def order(seed):
        return [int(i) for batch in make_loader(list(range(16)), shuffle=True, seed=seed, batch_size=4) for i in batch]

    assert order(5) == order(5) and sorted(order(5)) == list(range(16))
    assert order(5) != order(0)


def test_evaluation_loaders_read_the_held_out_blocks_in_order(tmp_path):
    from lightning_nf4.data.text import TextDataModule

    tiny_tokenizer().save_pretrained(tmp_path)
    dm = TextDataModule(source="pydoc", tokenizer_name_or_path=str(tmp_path), block_size=16, batch_size=3, max_train_blocks=4, max_val_blocks=9)
    dm.setup("fit")
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert torch.equal(torch.cat([batch["input_ids"] for batch in loader]), dm.val_set.blocks)
